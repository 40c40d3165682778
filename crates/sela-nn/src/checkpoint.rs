//! Checkpoints: one safetensors file with the weights, the BatchNorm running statistics and
//! (optionally) the optimiser state, and one metadata entry, `sela.checkpoint`, holding JSON:
//! the format and its version, the [`ModelSpec`], the optimiser's kind and step count, and the
//! [`TrainState`] (round, epoch, step, seed, RNG state, config hash, and whatever else the caller
//! needs to resume). Tensor names follow PyTorch's conventions (`stages.0.blocks.0.conv1.weight`,
//! `….bn1.running_mean`); optimiser state is stored as `optimizer.<state>.<parameter>`.
//!
//! Files are written atomically (temporary name, then rename), so an interrupted write leaves the
//! previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{NnError, Result};
use crate::network::Network;
use crate::optim::{Optimizer, OptimizerKind};
use crate::spec::ModelSpec;

/// The metadata key.
pub const KEY: &str = "sela.checkpoint";
/// The `format` value that marks a sela checkpoint.
pub const FORMAT: &str = "sela-checkpoint";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

/// Where training stood when the checkpoint was written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// The self-labelling round.
    pub round: u32,
    /// Epochs completed, counted over the whole pipeline.
    pub epoch: u32,
    /// Optimisation steps completed, counted over the whole pipeline.
    pub step: u64,
    /// Batches of the current epoch already trained on (non-zero only mid-epoch).
    pub batch: u64,
    /// The pipeline seed.
    pub seed: u64,
    /// State of any sequential random generator the trainer keeps.
    pub rng_state: u64,
    /// Hash of the pipeline config that produced the checkpoint.
    pub config_hash: Option<String>,
    /// Free-form entries for the caller (e.g. the training log so far).
    pub extra: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    version: u32,
    spec: ModelSpec,
    optimizer: Option<OptimizerMeta>,
    state: TrainState,
}

#[derive(Debug, Serialize, Deserialize)]
struct OptimizerMeta {
    config: OptimizerKind,
    steps: u64,
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub network: Network,
    pub optimizer: Option<Optimizer>,
    pub state: TrainState,
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serialises a checkpoint into safetensors bytes.
pub fn to_bytes(
    network: &Network,
    optimizer: Option<&Optimizer>,
    state: &TrainState,
) -> Result<Vec<u8>> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for p in network.params().iter().chain(network.buffers()) {
        named.push((p.name.clone(), p.shape.clone(), bytes_of(&p.data)));
    }
    if let Some(opt) = optimizer {
        for (s, tensors) in opt.kind.state_names().iter().zip(&opt.state) {
            for (p, t) in network.params().iter().zip(tensors) {
                named.push((
                    format!("optimizer.{s}.{}", p.name),
                    p.shape.clone(),
                    bytes_of(t),
                ));
            }
        }
    }
    let meta = Meta {
        format: FORMAT.to_string(),
        version: VERSION,
        spec: network.spec().clone(),
        optimizer: optimizer.map(|o| OptimizerMeta {
            config: o.kind.clone(),
            steps: o.steps,
        }),
        state: state.clone(),
    };
    let views = named
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| NnError::Input(format!("cannot serialise a checkpoint tensor: {e}")))?;
    // A single metadata entry keeps the header's bytes deterministic.
    let info: HashMap<String, String> = [(
        KEY.to_string(),
        serde_json::to_string(&meta).expect("checkpoint metadata serialises"),
    )]
    .into();
    safetensors::serialize(views, Some(info))
        .map_err(|e| NnError::Input(format!("cannot serialise a checkpoint: {e}")))
}

/// Writes a checkpoint to `path` atomically.
pub fn save(
    path: &Path,
    network: &Network,
    optimizer: Option<&Optimizer>,
    state: &TrainState,
) -> Result<PathBuf> {
    let bytes = to_bytes(network, optimizer, state)?;
    Ok(sela_io::atomic::write_bytes(path, &bytes)?)
}

/// Reads a checkpoint and checks it was made for `expected` (same input shape, backbone and
/// heads); the error says what differs.
pub fn load(path: &Path, expected: &ModelSpec) -> Result<Checkpoint> {
    let ck = load_any(path)?;
    if let Some(diff) = ck.network.spec().mismatch(expected) {
        return Err(NnError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("checkpoint was made for {diff}"),
        });
    }
    Ok(ck)
}

/// Reads a checkpoint for `expected` like [`load`], except that a checkpoint whose heads all read
/// the pooled last stage may be asked for some on the embedding (as at
/// `model.embedding_heads_from_round`). Then it is carried over: the backbone and every head whose input is unchanged keep their values and
/// optimiser state; a head whose input changed starts afresh, as [`Network::init`] with `seed`
/// draws it, with zero optimiser state.
pub fn load_carrying_heads(path: &Path, expected: &ModelSpec, seed: u64) -> Result<Checkpoint> {
    let ck = load_any(path)?;
    let held = ck.network.spec();
    let same_but_heads = ModelSpec {
        embedding_heads: expected.embedding_heads.clone(),
        embedding_readout: expected.embedding_readout,
        ..held.clone()
    };
    if let Some(diff) = same_but_heads.mismatch(expected) {
        return Err(NnError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("checkpoint was made for {diff}"),
        });
    }
    if held == expected {
        return Ok(ck);
    }
    if !held.embedding_heads.is_empty() {
        return Err(NnError::Checkpoint {
            path: path.to_path_buf(),
            message: format!(
                "checkpoint was made for {}",
                held.mismatch(expected).unwrap_or_default()
            ),
        });
    }
    let mut network = Network::init(expected, seed)?;
    let restarted: Vec<String> = (0..expected.heads.len())
        .filter(|&h| held.head_readout(h) != expected.head_readout(h))
        .map(|h| format!("heads.{h}."))
        .collect();
    let old: HashMap<&str, usize> = ck
        .network
        .params()
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let kept: Vec<Option<usize>> = network
        .params()
        .iter()
        .map(|p| {
            let restarts = restarted.iter().any(|r| p.name.starts_with(r.as_str()));
            old.get(p.name.as_str()).copied().filter(|_| !restarts)
        })
        .collect();
    for (p, k) in network.params_mut().iter_mut().zip(&kept) {
        if let Some(i) = *k {
            p.data.clone_from(&ck.network.params()[i].data);
        }
    }
    for (b, old) in network.buffers_mut().iter_mut().zip(ck.network.buffers()) {
        b.data.clone_from(&old.data);
    }
    let optimizer = ck.optimizer.map(|old| {
        let mut opt = Optimizer::new(old.kind.clone(), network.params());
        opt.steps = old.steps;
        for (new_state, old_state) in opt.state.iter_mut().zip(&old.state) {
            for (t, k) in new_state.iter_mut().zip(&kept) {
                if let Some(i) = *k {
                    t.clone_from(&old_state[i]);
                }
            }
        }
        opt
    });
    Ok(Checkpoint {
        network,
        optimizer,
        state: ck.state,
    })
}

/// Reads a checkpoint, whatever architecture it holds.
pub fn load_any(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| NnError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    from_bytes(path, &bytes)
}

/// Parses checkpoint bytes (`path` only names the source in errors).
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let fail = |message: String| NnError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let not_sela = || fail("not a sela checkpoint (no `sela.checkpoint` metadata)".to_string());
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
    let raw = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(KEY))
        .ok_or_else(not_sela)?;
    let meta: Meta =
        serde_json::from_str(raw).map_err(|e| fail(format!("unreadable `{KEY}` metadata: {e}")))?;
    if meta.format != FORMAT {
        return Err(not_sela());
    }
    if meta.version != VERSION {
        return Err(fail(format!(
            "checkpoint format version {}, this build reads version {VERSION}",
            meta.version
        )));
    }
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| fail(format!("corrupt safetensors data: {e}")))?;
    let mut network = Network::init(&meta.spec, 0).map_err(|e| fail(e.to_string()))?;
    let read = |name: &str, shape: &[usize], out: &mut Vec<f32>| -> Result<()> {
        let t = tensors.tensor(name).map_err(|_| {
            fail(format!(
                "tensor `{name}` is missing: the file does not hold the architecture its metadata describes"
            ))
        })?;
        if t.dtype() != Dtype::F32 || t.shape() != shape {
            return Err(fail(format!(
                "tensor `{name}` is {:?} {:?}, expected F32 {:?}",
                t.dtype(),
                t.shape(),
                shape
            )));
        }
        out.clear();
        out.extend(
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    };
    for p in network.params_mut() {
        read(&p.name.clone(), &p.shape.clone(), &mut p.data)?;
    }
    for p in network.buffers_mut() {
        read(&p.name.clone(), &p.shape.clone(), &mut p.data)?;
    }
    let optimizer = match meta.optimizer {
        None => None,
        Some(om) => {
            let mut opt = Optimizer::new(om.config, network.params());
            opt.steps = om.steps;
            let names = opt.kind.state_names();
            for (s, tensors) in names.iter().zip(opt.state.iter_mut()) {
                for (p, t) in network.params().iter().zip(tensors.iter_mut()) {
                    read(&format!("optimizer.{s}.{}", p.name), &p.shape, t)?;
                }
            }
            Some(opt)
        }
    };
    let expected = network.params().len() * (1 + optimizer.as_ref().map_or(0, |o| o.state.len()))
        + network.buffers().len();
    if tensors.len() != expected {
        return Err(fail(format!(
            "holds {} tensors, the architecture in its metadata has {expected}: another architecture",
            tensors.len()
        )));
    }
    Ok(Checkpoint {
        network,
        optimizer,
        state: meta.state,
    })
}
