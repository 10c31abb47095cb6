//! Read an image's backing chain, top first, without taking any lock (works while a VM runs).
//!
//! ```sh
//! cargo run -p virt-snap --example image_chain -- /var/lib/images/vm1.qcow2
//! ```

use virt_snap::image::{Image, ProbePolicy};

fn main() -> Result<(), virt_snap::Error> {
    let path = std::env::args().nth(1).expect("usage: image_chain IMAGE");
    // Formats are read from what each image records; never guessed (ProbePolicy::Never).
    for info in Image::at(&path).chain(None, ProbePolicy::Never)? {
        println!(
            "{} ({}, {} bytes virtual, {} snapshots)",
            info.filename,
            info.format(),
            info.virtual_size(),
            info.snapshots().len()
        );
    }
    Ok(())
}
