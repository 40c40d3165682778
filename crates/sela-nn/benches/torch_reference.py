"""The sela-nn backbone in PyTorch, for a side-by-side speed comparison with `train_speed`.

Same network as sela_nn::Network (3x3 stem + BN + ReLU; stages of basic residual blocks, stride 2
in the first block of every stage after the first, 1x1 conv + BN projection shortcuts; global
average pooling; linear heads), same batch, SGD with momentum 0.9 and weight decay, float32,
on CPU with a fixed number of threads. Prints `images_per_sec <value>` last: the best of
`--repeats` timings of `--steps` steps (other load on the machine only ever slows a run down).

    python3 benches/torch_reference.py --channels 1 --size 28 --batch 256 --threads 2
"""

import argparse
import time

import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(h + s)


class Net(nn.Module):
    def __init__(self, channels, widths, blocks, heads):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers, cin = [], widths[0]
        for s, (w, b) in enumerate(zip(widths, blocks)):
            for i in range(b):
                layers.append(Block(cin, w, 2 if s > 0 and i == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(cin, k) for k in heads)

    def forward(self, x):
        e = self.stages(self.stem(x)).mean((2, 3))
        return [h(e) for h in self.heads]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--widths", default="16,32,64")
    p.add_argument("--blocks", default="1,1,1")
    p.add_argument("--heads", default="10")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ints = lambda s: [int(v) for v in s.split(",")]
    heads = ints(a.heads)
    net = Net(a.channels, ints(a.widths), ints(a.blocks), heads)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(a.batch, a.channels, a.size, a.size)
    if a.channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = [torch.randint(0, k, (a.batch,)) for k in heads]
    net.train()

    def step():
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = sum(F.cross_entropy(o, t) for o, t in zip(out, y)) / len(out)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    best = 0.0
    for _ in range(a.repeats):
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        best = max(best, a.steps * a.batch / (time.perf_counter() - t))
    print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch}, best of {a.repeats}")
    print(f"images_per_sec {best:.1f}")


if __name__ == "__main__":
    main()
