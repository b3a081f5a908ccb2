//! Patient-coordinate geometry of a series: direction cosines, the slice normal, where each slice
//! lies along it, and the mapping of a pixel to a point and back. DICOM's conventions (PS3.3
//! C.7.6.2.1.1): the first three values of Image Orientation (Patient) are the direction of
//! increasing column index (along a row), spaced by Pixel Spacing's *second* value; the last
//! three the direction of increasing row index, spaced by its *first* value.

/// Two orientations whose row and column directions are within this angle are the same plane
/// orientation (0.5°).
pub const ORIENTATION_TOLERANCE_DEG: f64 = 0.5;
/// Positions closer than this are the same point, in mm.
pub const SAME_POSITION_MM: f64 = 0.01;
/// Pixel spacings closer than this are the same, in mm.
pub const SAME_SPACING_MM: f64 = 0.001;

pub type Vec3 = [f64; 3];

pub fn dot(a: Vec3, b: Vec3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub fn cross(a: Vec3, b: Vec3) -> Vec3 {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub fn sub(a: Vec3, b: Vec3) -> Vec3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn norm(a: Vec3) -> f64 {
    dot(a, a).sqrt()
}

fn unit(a: Vec3) -> Option<Vec3> {
    let n = norm(a);
    (n.is_finite() && n > 1e-6).then(|| [a[0] / n, a[1] / n, a[2] / n])
}

/// A plane's orientation: unit row and column directions and their normal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Orientation {
    /// Direction of increasing column index.
    pub row: Vec3,
    /// Direction of increasing row index.
    pub column: Vec3,
    pub normal: Vec3,
}

impl Orientation {
    /// From Image Orientation (Patient); `None` unless both directions are usable and
    /// (nearly) perpendicular.
    pub fn new(cosines: [f64; 6]) -> Option<Self> {
        let row = unit([cosines[0], cosines[1], cosines[2]])?;
        let column = unit([cosines[3], cosines[4], cosines[5]])?;
        if dot(row, column).abs() > 0.01 {
            return None;
        }
        let normal = unit(cross(row, column))?;
        Some(Orientation {
            row,
            column,
            normal,
        })
    }

    /// Whether `other` is the same plane orientation within [`ORIENTATION_TOLERANCE_DEG`].
    pub fn matches(&self, other: &Orientation) -> bool {
        let limit = ORIENTATION_TOLERANCE_DEG.to_radians().cos();
        dot(self.row, other.row) >= limit && dot(self.column, other.column) >= limit
    }

    /// The largest angle between the two orientations' row or column directions, in degrees.
    pub fn angle_deg(&self, other: &Orientation) -> f64 {
        let angle = |a: Vec3, b: Vec3| dot(a, b).clamp(-1.0, 1.0).acos().to_degrees();
        angle(self.row, other.row).max(angle(self.column, other.column))
    }

    /// Exactly the same cosines (to 1e-4): the fast path's condition.
    pub fn same(&self, other: &Orientation) -> bool {
        let close = |a: Vec3, b: Vec3| (0..3).all(|i| (a[i] - b[i]).abs() <= 1e-4);
        close(self.row, other.row) && close(self.column, other.column)
    }
}

/// One slice's plane: where its first pixel's centre is, its orientation and pixel spacing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plane {
    pub origin: Vec3,
    pub orientation: Orientation,
    /// Row spacing (between rows, along `column`), then column spacing (along `row`), in mm.
    pub spacing: [f64; 2],
    pub rows: u32,
    pub columns: u32,
}

impl Plane {
    /// The patient-coordinate point of pixel (`row`, `column`) (fractional indices allowed).
    pub fn point(&self, row: f64, column: f64) -> Vec3 {
        let o = &self.orientation;
        let (dr, dc) = (self.spacing[0], self.spacing[1]);
        [
            self.origin[0] + column * dc * o.row[0] + row * dr * o.column[0],
            self.origin[1] + column * dc * o.row[1] + row * dr * o.column[1],
            self.origin[2] + column * dc * o.row[2] + row * dr * o.column[2],
        ]
    }

    /// The fractional (row, column) of a point projected onto this plane.
    pub fn index_of(&self, point: Vec3) -> (f64, f64) {
        let d = sub(point, self.origin);
        let o = &self.orientation;
        (
            dot(d, o.column) / self.spacing[0],
            dot(d, o.row) / self.spacing[1],
        )
    }

    /// Where the plane lies along `normal`, in mm.
    pub fn along(&self, normal: Vec3) -> f64 {
        dot(self.origin, normal)
    }

    /// The same pixel grid as `other` (fast path): size, spacing, orientation and origin.
    pub fn same_grid(&self, other: &Plane) -> bool {
        self.rows == other.rows
            && self.columns == other.columns
            && (self.spacing[0] - other.spacing[0]).abs() <= SAME_SPACING_MM
            && (self.spacing[1] - other.spacing[1]).abs() <= SAME_SPACING_MM
            && self.orientation.same(&other.orientation)
            && norm(sub(self.origin, other.origin)) <= SAME_POSITION_MM
    }
}

/// The median step between consecutive sorted positions; `None` for fewer than two.
pub fn median_step(sorted: &[f64]) -> Option<f64> {
    let mut steps: Vec<f64> = sorted.windows(2).map(|w| w[1] - w[0]).collect();
    if steps.is_empty() {
        return None;
    }
    steps.sort_by(f64::total_cmp);
    Some(steps[steps.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];

    #[test]
    fn points_and_indices_are_inverse_and_follow_dicom_conventions() {
        let plane = Plane {
            origin: [-100.0, -80.0, 20.0],
            orientation: Orientation::new(AXIAL).unwrap(),
            spacing: [0.5, 2.0],
            rows: 10,
            columns: 20,
        };
        // Column index moves along the row direction (x) by the column spacing (2.0).
        assert_eq!(plane.point(0.0, 3.0), [-94.0, -80.0, 20.0]);
        // Row index moves along the column direction (y) by the row spacing (0.5).
        assert_eq!(plane.point(4.0, 0.0), [-100.0, -78.0, 20.0]);
        let (r, c) = plane.index_of(plane.point(2.25, 7.5));
        assert!((r - 2.25).abs() < 1e-12 && (c - 7.5).abs() < 1e-12);
        assert_eq!(plane.along(plane.orientation.normal), 20.0);
    }

    #[test]
    fn orientations_match_within_the_tolerance_only() {
        let a = Orientation::new(AXIAL).unwrap();
        let tilt = |deg: f64| {
            let t = deg.to_radians();
            Orientation::new([t.cos(), t.sin(), 0.0, -t.sin(), t.cos(), 0.0]).unwrap()
        };
        assert!(a.matches(&tilt(0.4)));
        assert!(!a.matches(&tilt(0.6)));
        assert!((a.angle_deg(&tilt(3.0)) - 3.0).abs() < 1e-9);
        assert!(a.same(&a) && !a.same(&tilt(0.1)));
        // Not perpendicular, or zero: not an orientation.
        assert!(Orientation::new([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]).is_none());
        assert!(Orientation::new([0.0; 6]).is_none());
    }

    #[test]
    fn the_median_step_ignores_a_gap() {
        assert_eq!(median_step(&[0.0, 1.0, 2.0, 5.0, 6.0]), Some(1.0));
        assert_eq!(median_step(&[3.0]), None);
    }
}
