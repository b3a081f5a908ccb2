//! The tumour measured over a study's segmented reference slices: per class and per region, the
//! voxel count, the volume (pixel spacing × the spacing between slices, from the slice positions;
//! the slice thickness only when there is one slice), the bounding box of the voxel centres in
//! patient coordinates, and the range of slices it occurs on.

use super::Plan;
use super::geometry::Vec3;

/// One class's or region's measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub name: String,
    /// Label-map values it counts (one for a class).
    pub classes: Vec<u8>,
    pub voxels: u64,
    /// Millilitres; `None` when the voxel depth is unknown.
    pub volume_ml: Option<f64>,
    /// Lowest and highest patient coordinate of its voxel centres (mm); `None` when empty.
    pub bounds: Option<(Vec3, Vec3)>,
    /// First and last reference slice (index in the plan's slices) it occurs on.
    pub slices: Option<(usize, usize)>,
}

/// Measures every class of `labels` and every region (name, classes) over `masks`: each a
/// reference slice's index in `plan.slices` and its label map (the slice's rows × columns).
pub fn measure(
    plan: &Plan,
    masks: &[(usize, &[u8])],
    labels: &[String],
    regions: &[(String, Vec<u8>)],
) -> Vec<Measurement> {
    let mut out: Vec<Measurement> = labels
        .iter()
        .enumerate()
        .map(|(k, name)| (name.clone(), vec![k as u8]))
        .chain(regions.iter().cloned())
        .map(|(name, classes)| Measurement {
            name,
            classes,
            voxels: 0,
            volume_ml: None,
            bounds: None,
            slices: None,
        })
        .collect();
    for &(index, labels_map) in masks {
        let slice = &plan.slices[index];
        let columns = slice.plane.columns as usize;
        // Per class on this slice: count and the index box.
        let mut boxes: Vec<Option<(usize, usize, usize, usize)>> = vec![None; 256];
        let mut counts = [0u64; 256];
        for (p, &v) in labels_map.iter().enumerate() {
            let (r, c) = (p / columns, p % columns);
            counts[v as usize] += 1;
            let b = &mut boxes[v as usize];
            *b = Some(match *b {
                None => (r, r, c, c),
                Some((r0, r1, c0, c1)) => (r0.min(r), r1.max(r), c0.min(c), c1.max(c)),
            });
        }
        for m in &mut out {
            let voxels: u64 = m.classes.iter().map(|&k| counts[k as usize]).sum();
            if voxels == 0 {
                continue;
            }
            m.voxels += voxels;
            m.slices = Some(match m.slices {
                None => (index, index),
                Some((a, b)) => (a.min(index), b.max(index)),
            });
            // The index box of the union, then its corners in patient coordinates (the mapping is
            // affine, so the extremes are at corners).
            let (mut r0, mut r1, mut c0, mut c1) = (usize::MAX, 0, usize::MAX, 0);
            for &(a, b, c, d) in m.classes.iter().filter_map(|&k| boxes[k as usize].as_ref()) {
                (r0, r1, c0, c1) = (r0.min(a), r1.max(b), c0.min(c), c1.max(d));
            }
            for (r, c) in [(r0, c0), (r0, c1), (r1, c0), (r1, c1)] {
                let p = slice.plane.point(r as f64, c as f64);
                m.bounds = Some(match m.bounds {
                    None => (p, p),
                    Some((lo, hi)) => (
                        [lo[0].min(p[0]), lo[1].min(p[1]), lo[2].min(p[2])],
                        [hi[0].max(p[0]), hi[1].max(p[1]), hi[2].max(p[2])],
                    ),
                });
            }
        }
    }
    if let (Some((depth, _)), Some(first)) = (plan.depth, plan.slices.first()) {
        let [dr, dc] = first.plane.spacing;
        let voxel_ml = dr * dc * depth / 1000.0;
        for m in &mut out {
            m.volume_ml = Some(m.voxels as f64 * voxel_ml);
        }
    }
    out
}
