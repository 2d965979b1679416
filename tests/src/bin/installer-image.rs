//! Builds the installer image (see `bulwark_tests::harness::installer`):
//! `installer-image --oci-layout DIR --name REF`, for `skopeo copy oci:DIR:TAG ...` or
//! `kind load image-archive` after `skopeo copy oci:DIR:TAG oci-archive:FILE`.

use anyhow::{Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, name) = match args.as_slice() {
        [flag, dir, name_flag, name] if flag == "--oci-layout" && name_flag == "--name" => {
            (dir, name)
        }
        _ => bail!("usage: installer-image --oci-layout DIR --name REGISTRY/REPO:TAG"),
    };
    let image = bulwark_tests::harness::installer::installer_image()?;
    bulwark_runtime::image::write_layout(std::path::Path::new(dir), &[(name.as_str(), &image)])?;
    println!("{name} {} in {dir}", image.manifest.descriptor.digest);
    Ok(())
}
