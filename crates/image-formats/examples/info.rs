//! Print what `qemu-img info --output=json` prints, read natively:
//! `cargo run -p image-formats --example info -- IMAGE [--backing-chain]`.

use image_formats::{backing_chain, ChainOptions, ImageInfo};
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(file) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: info IMAGE [--backing-chain]");
        std::process::exit(2);
    };
    let json = if args.iter().any(|a| a == "--backing-chain") {
        let chain = backing_chain(Path::new(file), None, ChainOptions::default())?;
        serde_json::Value::Array(chain.iter().map(ImageInfo::to_json).collect())
    } else {
        ImageInfo::open(Path::new(file), None)?.to_json()
    };
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
