//! DICOM modality values → 8-bit gray, by the model's [`DicomWindow`] policy. Each window is the
//! same float64 operations, in the same order, as pydicom 3.0's `apply_windowing` / `apply_voi`
//! (and numpy's `percentile`), so `tests/reference/dicom_reference.py` gets identical 8-bit
//! images:
//!
//! 1. a window maps a value `x` to `y` in `[y_min, y_max]`: the stored range through the Rescale
//!    (header and fixed windows, as pydicom's output range), `[0, 2^bits - 1]` (a VOI LUT) or the
//!    image's own range (min–max, percentiles);
//! 2. `t = (y - y_min) / (y_max - y_min)`, clipped to `[0, 1]`; the 8-bit value is
//!    `floor(t × 255 + 0.5)`;
//! 3. MONOCHROME1 is inverted (`255 - v`); padding pixels become 0.

use crate::input::InputError;
use crate::input::dicom::{Header, Photometric, VoiFunction};
use crate::model::DicomWindow;

/// A window resolved for one image.
#[derive(Debug, Clone, PartialEq)]
enum Resolved<'a> {
    Linear {
        center: f64,
        width: f64,
        exact: bool,
    },
    Sigmoid {
        center: f64,
        width: f64,
    },
    Lut(&'a crate::input::dicom::Lut),
    /// The image's own range `[low, high]`, clipped.
    Range {
        low: f64,
        high: f64,
    },
}

fn invalid(message: String) -> InputError {
    InputError::Decode {
        format: "DICOM",
        message,
    }
}

/// One frame's modality values to 8-bit gray.
pub fn to_gray8(
    values: &[f64],
    padding: Option<&[bool]>,
    header: &Header,
    window: DicomWindow,
) -> Result<Vec<u8>, InputError> {
    let is_image = |i: usize| padding.is_none_or(|p| !p[i]);
    let own_range = || {
        let mut low = f64::INFINITY;
        let mut high = f64::NEG_INFINITY;
        for (i, &v) in values.iter().enumerate() {
            if is_image(i) {
                low = low.min(v);
                high = high.max(v);
            }
        }
        Resolved::Range { low, high }
    };
    let resolved = match window {
        DicomWindow::Header => {
            if let Some(lut) = &header.voi_lut {
                Resolved::Lut(lut)
            } else if let Some(&(center, width)) = header.windows.first() {
                match header.voi_function {
                    VoiFunction::Linear => Resolved::Linear {
                        center,
                        width,
                        exact: false,
                    },
                    VoiFunction::LinearExact => Resolved::Linear {
                        center,
                        width,
                        exact: true,
                    },
                    VoiFunction::Sigmoid => Resolved::Sigmoid { center, width },
                }
            } else {
                own_range()
            }
        }
        DicomWindow::Fixed { center, width } => Resolved::Linear {
            center,
            width,
            exact: false,
        },
        DicomWindow::MinMax => own_range(),
        DicomWindow::Percentile { low, high } => {
            let mut image: Vec<f64> = values
                .iter()
                .enumerate()
                .filter(|&(i, _)| is_image(i))
                .map(|(_, &v)| v)
                .collect();
            if image.is_empty() {
                Resolved::Range {
                    low: f64::INFINITY,
                    high: f64::NEG_INFINITY,
                }
            } else {
                Resolved::Range {
                    low: percentile(&mut image, low),
                    high: percentile(&mut image, high),
                }
            }
        }
    };
    let (y_min, y_max) = match &resolved {
        Resolved::Linear { width, exact, .. } => {
            if (!exact && *width < 1.0) || (*exact && *width <= 0.0) {
                return Err(invalid(format!(
                    "Window Width {width} is too small for a {} window",
                    if *exact { "LINEAR_EXACT" } else { "LINEAR" }
                )));
            }
            header.window_range()
        }
        Resolved::Sigmoid { width, .. } => {
            if *width <= 0.0 {
                return Err(invalid(format!(
                    "Window Width {width} is too small for a SIGMOID window"
                )));
            }
            header.window_range()
        }
        Resolved::Lut(lut) => (0.0, 2f64.powi(lut.bits as i32) - 1.0),
        Resolved::Range { low, high } => (*low, *high),
    };
    let y_range = y_max - y_min;
    let map = |x: f64| -> f64 {
        match resolved {
            Resolved::Linear {
                center,
                width,
                exact,
            } => {
                let (c, w) = if exact {
                    (center, width)
                } else {
                    (center - 0.5, width - 1.0)
                };
                if x <= c - w / 2.0 {
                    y_min
                } else if x > c + w / 2.0 {
                    y_max
                } else {
                    ((x - c) / w + 0.5) * y_range + y_min
                }
            }
            Resolved::Sigmoid { center, width } => {
                y_range / (1.0 + (-4.0 * (x - center) / width).exp()) + y_min
            }
            Resolved::Lut(lut) => lut.lookup(x),
            Resolved::Range { low, high } => x.clamp(low, high),
        }
    };
    let invert = header.photometric == Photometric::Monochrome1;
    // Empty, single-valued or all-padding images (an infinite or NaN range) map to 0.
    let flat = !y_range.is_finite() || y_range <= 0.0;
    Ok(values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if !is_image(i) {
                return 0;
            }
            let t = if flat {
                0.0
            } else {
                ((map(x) - y_min) / y_range).clamp(0.0, 1.0)
            };
            let v = (t * 255.0 + 0.5).floor() as u8;
            if invert { 255 - v } else { v }
        })
        .collect())
}

/// numpy's `percentile(values, p)` with the default `linear` method, to the bit: `(n - 1) × q`,
/// then `_lerp` (`a + (b - a) t`, or `b - (b - a)(1 - t)` when `t ≥ 0.5`). Reorders `values`.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    let n = values.len();
    let q = p / 100.0;
    let virtual_index = (n - 1) as f64 * q;
    let by = |a: &f64, b: &f64| a.total_cmp(b);
    if virtual_index >= (n - 1) as f64 {
        return *values.iter().max_by(|a, b| by(a, b)).expect("not empty");
    }
    if virtual_index < 0.0 {
        return *values.iter().min_by(|a, b| by(a, b)).expect("not empty");
    }
    let previous = virtual_index.floor();
    let i = previous as usize;
    let (_, &mut a, above) = values.select_nth_unstable_by(i, by);
    let b = *above.iter().min_by(|a, b| by(a, b)).expect("i < n - 1");
    let t = virtual_index - previous;
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([1, 2, 3, 4, 10], [0, 25, 50, 62.5, 90, 100])
        let data = [10.0, 3.0, 1.0, 4.0, 2.0];
        for (p, expected) in [
            (0.0, 1.0),
            (25.0, 2.0),
            (50.0, 3.0),
            (62.5, 3.5),
            (90.0, 7.6000000000000005),
            (100.0, 10.0),
        ] {
            let mut v = data;
            assert_eq!(percentile(&mut v, p), expected, "p = {p}");
        }
    }
}
