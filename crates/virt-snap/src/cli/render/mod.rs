//! Renderers: the text the CLI prints, one module per tool whose output it reproduces.

pub mod qemu_img;
pub mod virsh;
