//! Tells the crate which target it is built for (for `cargo metadata --filter-platform`).
fn main() {
    println!(
        "cargo:rustc-env=BULWARK_TESTS_TARGET={}",
        std::env::var("TARGET").expect("cargo sets TARGET for build scripts")
    );
}
