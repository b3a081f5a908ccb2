//! Resampling one slice of a series onto a reference slice's pixel grid, in patient coordinates:
//! each reference pixel's centre is projected onto the source slice's plane and the source is
//! sampled there bilinearly; a point outside the source's pixel centres (by more than a
//! hundredth of a pixel) is 0. This is what `scipy.ndimage.map_coordinates(order=1,
//! mode="constant")` computes for the same coordinates (`tests/reference/resample_reference.py`
//! checks it on synthetic series of other spacings, positions and orientations).

use super::geometry::Plane;

/// How far outside the outermost pixel centres a point may be and still be sampled (clamped).
const EDGE: f64 = 0.01;

/// `source` (its plane's `rows × columns` values, row-major) resampled onto `target`'s grid.
pub fn onto(source: &[f32], from: &Plane, target: &Plane) -> Vec<f32> {
    let (rows, columns) = (from.rows as usize, from.columns as usize);
    assert_eq!(
        source.len(),
        rows * columns,
        "a plane's values: this is a bug"
    );
    // The source index of a target pixel is affine in the target's (row, column).
    let origin = from.index_of(target.point(0.0, 0.0));
    let down = {
        let p = from.index_of(target.point(1.0, 0.0));
        (p.0 - origin.0, p.1 - origin.1)
    };
    let right = {
        let p = from.index_of(target.point(0.0, 1.0));
        (p.0 - origin.0, p.1 - origin.1)
    };
    let (max_r, max_c) = ((rows - 1) as f64, (columns - 1) as f64);
    let mut out = Vec::with_capacity(target.rows as usize * target.columns as usize);
    for tr in 0..target.rows as usize {
        let start = (origin.0 + tr as f64 * down.0, origin.1 + tr as f64 * down.1);
        for tc in 0..target.columns as usize {
            let r = start.0 + tc as f64 * right.0;
            let c = start.1 + tc as f64 * right.1;
            if r < -EDGE || c < -EDGE || r > max_r + EDGE || c > max_c + EDGE {
                out.push(0.0);
                continue;
            }
            let (r, c) = (r.clamp(0.0, max_r), c.clamp(0.0, max_c));
            let (r0, c0) = (r.floor() as usize, c.floor() as usize);
            let (r1, c1) = ((r0 + 1).min(rows - 1), (c0 + 1).min(columns - 1));
            let (fr, fc) = (r - r0 as f64, c - c0 as f64);
            let at = |r: usize, c: usize| f64::from(source[r * columns + c]);
            let top = at(r0, c0) * (1.0 - fc) + at(r0, c1) * fc;
            let bottom = at(r1, c0) * (1.0 - fc) + at(r1, c1) * fc;
            out.push((top * (1.0 - fr) + bottom * fr) as f32);
        }
    }
    out
}

/// `(1 − w)·a + w·b`, value by value: linear interpolation between two resampled neighbours.
pub fn blend(a: &[f32], b: &[f32], w: f64) -> Vec<f32> {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) * (1.0 - w) + f64::from(y) * w) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::geometry::Orientation;
    use super::*;

    fn axial(origin: [f64; 3], spacing: [f64; 2], rows: u32, columns: u32) -> Plane {
        Plane {
            origin,
            orientation: Orientation::new([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]).unwrap(),
            spacing,
            rows,
            columns,
        }
    }

    #[test]
    fn the_same_grid_is_the_identity() {
        let plane = axial([0.0, 0.0, 5.0], [1.0, 1.0], 3, 4);
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(onto(&values, &plane, &plane), values);
    }

    #[test]
    fn a_finer_grid_interpolates_and_outside_is_zero() {
        // Source: 2×2 pixels of 2 mm; values 0, 10 / 20, 30.
        let from = axial([0.0, 0.0, 0.0], [2.0, 2.0], 2, 2);
        // Target: 1 mm pixels from the same origin, 4×4: its last row and column are outside.
        let target = axial([0.0, 0.0, 0.0], [1.0, 1.0], 4, 4);
        let out = onto(&[0.0, 10.0, 20.0, 30.0], &from, &target);
        assert_eq!(&out[0..4], &[0.0, 5.0, 10.0, 0.0]);
        assert_eq!(&out[4..8], &[10.0, 15.0, 20.0, 0.0]);
        assert_eq!(&out[8..12], &[20.0, 25.0, 30.0, 0.0]);
        assert_eq!(&out[12..16], &[0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn a_shifted_source_is_sampled_where_the_points_are() {
        // The source's origin is 1 mm further along x: target column c is source column c − 1.
        let from = axial([1.0, 0.0, 0.0], [1.0, 1.0], 1, 3);
        let target = axial([0.0, 0.0, 0.0], [1.0, 1.0], 1, 4);
        assert_eq!(onto(&[7.0, 8.0, 9.0], &from, &target), [0.0, 7.0, 8.0, 9.0]);
        assert_eq!(blend(&[0.0, 10.0], &[10.0, 20.0], 0.25), [2.5, 12.5]);
    }
}
