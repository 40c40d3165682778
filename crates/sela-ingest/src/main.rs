//! `sela-ingest`: image datasets into sela's canonical dataset Parquet.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sela_ingest::{IdxOptions, Size};

#[derive(Parser)]
#[command(
    name = "sela-ingest",
    version,
    about = "Read an image dataset (IDX, image folder, Hugging Face Parquet) into sela's dataset table",
    after_help = "Examples:\n  \
        sela-ingest idx --images train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz \\\n      \
            --class-names 'T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot' \\\n      \
            --output data/fashion-mnist/train.parquet\n  \
        sela-ingest image-folder --root cifar10/train --output cifar10-train.parquet\n  \
        sela-ingest hf-parquet --input train-00000-of-00001.parquet --output train.parquet"
)]
struct Args {
    #[command(subcommand)]
    format: Format,
    #[command(flatten)]
    output: sela_cli::OutputArgs,
}

#[derive(Subcommand)]
enum Format {
    /// IDX files, as MNIST and Fashion-MNIST ship (plain or .gz).
    Idx {
        /// The `*-images-idx3-ubyte[.gz]` file.
        #[arg(long)]
        images: PathBuf,
        /// The matching `*-labels-idx1-ubyte[.gz]` file.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// The dataset Parquet to write.
        #[arg(long)]
        output: PathBuf,
        /// Class names, comma-separated, index = label.
        #[arg(long, value_delimiter = ',')]
        class_names: Vec<String>,
        /// Keep the first N images of each class (a class-balanced subset).
        #[arg(long, value_name = "N")]
        per_class: Option<usize>,
        /// Keep the first N images.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// A folder of class sub-folders of PNG/JPEG images (ROOT/<class>/<image>).
    ImageFolder {
        /// The folder holding one sub-folder per class.
        #[arg(long)]
        root: PathBuf,
        /// The dataset Parquet to write.
        #[arg(long)]
        output: PathBuf,
        /// Resize every image to WIDTHxHEIGHT (stored as PNG).
        #[arg(long, value_name = "WxH")]
        resize: Option<Size>,
    },
    /// A Hugging Face image Parquet file (ids added, images validated).
    HfParquet {
        /// The input Parquet file.
        #[arg(long)]
        input: PathBuf,
        /// The dataset Parquet to write.
        #[arg(long)]
        output: PathBuf,
        /// The image struct column.
        #[arg(long, default_value = "image")]
        image_column: String,
        /// The integer label column (optional in the file).
        #[arg(long, default_value = "label")]
        label_column: String,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    sela_cli::run(|| match &args.format {
        Format::Idx {
            images,
            labels,
            output,
            class_names,
            per_class,
            limit,
        } => sela_ingest::ingest_idx(
            images,
            labels.as_deref(),
            output,
            &IdxOptions {
                per_class: *per_class,
                limit: *limit,
                class_names: class_names.clone(),
                quiet: args.output.quiet,
            },
        ),
        Format::ImageFolder {
            root,
            output,
            resize,
        } => sela_ingest::ingest_image_folder(root, output, *resize, args.output.quiet),
        Format::HfParquet {
            input,
            output,
            image_column,
            label_column,
        } => sela_ingest::ingest_hf_parquet(
            input,
            output,
            image_column,
            label_column,
            args.output.quiet,
        ),
    })
}
