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

/// One frame's stored values to 8-bit gray. Each distinct stored value is mapped once (modality
/// value, window, 8 bits, inversion) into a table, then every pixel is a lookup: the same result
/// as mapping each pixel, at a fraction of the float work. Statistics (min–max, percentiles) come
/// from the histogram of stored values, over the pixels that are not padding.
pub fn to_gray8(
    stored: &[i32],
    padding: Option<&[bool]>,
    header: &Header,
    window: DicomWindow,
) -> Result<Vec<u8>, InputError> {
    map_frame(stored, padding, header, window, 0u8, |w, x| w.gray(x))
}

/// One frame's stored values to unrounded float32 levels `t × 255` (`output = "float"`):
/// MONOCHROME1 inverted (`255 - v`), padding 0.
pub fn to_float(
    stored: &[i32],
    padding: Option<&[bool]>,
    header: &Header,
    window: DicomWindow,
) -> Result<Vec<f32>, InputError> {
    map_frame(stored, padding, header, window, 0f32, |w, x| w.level(x))
}

fn map_frame<T: Copy>(
    stored: &[i32],
    padding: Option<&[bool]>,
    header: &Header,
    window: DicomWindow,
    pad_value: T,
    map: impl Fn(&Window<'_>, f64) -> T,
) -> Result<Vec<T>, InputError> {
    let is_image = |i: usize| padding.is_none_or(|p| !p[i]);
    let (low, high) = stored
        .iter()
        .fold((i32::MAX, i32::MIN), |(l, h), &s| (l.min(s), h.max(s)));
    if stored.is_empty() {
        return Ok(Vec::new());
    }
    let span = (i64::from(high) - i64::from(low) + 1) as usize;
    if span > 1 << 20 {
        // Very wide stored ranges (32-bit samples): map pixel by pixel.
        let values: Vec<(f64, u32)> = stored
            .iter()
            .enumerate()
            .filter(|&(i, _)| is_image(i))
            .map(|(_, &s)| (header.modality(s), 1))
            .collect();
        let resolved = Window::resolve(header, window, values)?;
        return Ok(stored
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                if is_image(i) {
                    map(&resolved, header.modality(s))
                } else {
                    pad_value
                }
            })
            .collect());
    }
    // Only the image-statistics windows need the histogram.
    let statistics = match window {
        DicomWindow::MinMax | DicomWindow::Percentile { .. } => true,
        DicomWindow::Header => header.voi_lut.is_none() && header.windows.is_empty(),
        DicomWindow::Fixed { .. } => false,
    };
    let mut present = Vec::new();
    if statistics {
        let mut counts = vec![0u32; span];
        match padding {
            None => stored.iter().for_each(|&s| counts[(s - low) as usize] += 1),
            Some(p) => stored
                .iter()
                .zip(p)
                .filter(|(_, pad)| !**pad)
                .for_each(|(&s, _)| counts[(s - low) as usize] += 1),
        }
        present = counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(k, &c)| (header.modality(low + k as i32), c))
            .collect();
    }
    let resolved = Window::resolve(header, window, present)?;
    let table: Vec<T> = (0..span)
        .map(|k| map(&resolved, header.modality(low + k as i32)))
        .collect();
    Ok(match padding {
        None => stored.iter().map(|&s| table[(s - low) as usize]).collect(),
        Some(p) => stored
            .iter()
            .zip(p)
            .map(|(&s, &pad)| {
                if pad {
                    pad_value
                } else {
                    table[(s - low) as usize]
                }
            })
            .collect(),
    })
}

/// A resolved window: modality value → 8-bit gray.
struct Window<'a> {
    resolved: Resolved<'a>,
    y_min: f64,
    y_max: f64,
    invert: bool,
}

impl<'a> Window<'a> {
    /// The model's policy for this image; `values` are the image's (non-padding) modality values
    /// with their pixel counts, for the min–max and percentile policies.
    fn resolve(
        header: &'a Header,
        window: DicomWindow,
        mut values: Vec<(f64, u32)>,
    ) -> Result<Self, InputError> {
        let own_range = |values: &[(f64, u32)]| {
            let (low, high) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &(v, _)| {
                    (l.min(v), h.max(v))
                });
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
                    own_range(&values)
                }
            }
            DicomWindow::Fixed { center, width } => Resolved::Linear {
                center,
                width,
                exact: false,
            },
            DicomWindow::MinMax => own_range(&values),
            DicomWindow::Percentile { low, high } => {
                if values.is_empty() {
                    Resolved::Range {
                        low: f64::INFINITY,
                        high: f64::NEG_INFINITY,
                    }
                } else {
                    values.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Resolved::Range {
                        low: percentile_counted(&values, low),
                        high: percentile_counted(&values, high),
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
        Ok(Window {
            resolved,
            y_min,
            y_max,
            invert: header.photometric == Photometric::Monochrome1,
        })
    }

    /// pydicom's windowing of `x` into `[y_min, y_max]`, then 8 bits.
    fn gray(&self, x: f64) -> u8 {
        let v = (self.t(x) * 255.0 + 0.5).floor() as u8;
        if self.invert { 255 - v } else { v }
    }

    /// The same window, unrounded: `t × 255` as float32.
    fn level(&self, x: f64) -> f32 {
        let v = (self.t(x) * 255.0) as f32;
        if self.invert { 255.0 - v } else { v }
    }

    /// `(y - y_min) / (y_max - y_min)` of pydicom's windowed `y`, clipped to [0, 1].
    fn t(&self, x: f64) -> f64 {
        let (y_min, y_max) = (self.y_min, self.y_max);
        let y_range = y_max - y_min;
        // Empty, single-valued or all-padding images (an infinite or NaN range) map to 0.
        if !y_range.is_finite() || y_range <= 0.0 {
            0.0
        } else {
            let y = match self.resolved {
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
            };
            ((y - y_min) / y_range).clamp(0.0, 1.0)
        }
    }
}

/// numpy's `percentile(values, p)` with the default `linear` method, to the bit, of a multiset
/// given as (value, count) sorted by value: `(n - 1) × q`, then [`lerp`] of its neighbours.
fn percentile_counted(sorted: &[(f64, u32)], p: f64) -> f64 {
    let n: u64 = sorted.iter().map(|&(_, c)| u64::from(c)).sum();
    let nth = |k: u64| -> f64 {
        let mut seen = 0u64;
        for &(v, c) in sorted {
            seen += u64::from(c);
            if k < seen {
                return v;
            }
        }
        sorted[sorted.len() - 1].0
    };
    let q = p / 100.0;
    let virtual_index = (n - 1) as f64 * q;
    if virtual_index >= (n - 1) as f64 {
        return nth(n - 1);
    }
    if virtual_index < 0.0 {
        return nth(0);
    }
    let previous = virtual_index.floor();
    let i = previous as u64;
    let (a, b) = (nth(i), nth(i + 1));
    let t = virtual_index - previous;
    lerp(a, b, t)
}

/// numpy's `_lerp`: `a + (b - a) t`, or `b - (b - a)(1 - t)` when `t ≥ 0.5`.
fn lerp(a: f64, b: f64, t: f64) -> f64 {
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
    fn counted_percentile_handles_repeated_values() {
        // np.percentile([1, 1, 1, 5, 5, 9], [10, 50, 75, 99]) = [1, 3, 5, 8.8]
        let counted = [(1.0, 3), (5.0, 2), (9.0, 1)];
        for (p, expected) in [(10.0, 1.0), (50.0, 3.0), (75.0, 5.0), (99.0, 8.8)] {
            assert_eq!(percentile_counted(&counted, p), expected, "p = {p}");
        }
    }

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
            let mut counted: Vec<(f64, u32)> = data.iter().map(|&x| (x, 1)).collect();
            counted.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert_eq!(
                percentile_counted(&counted, p),
                expected,
                "p = {p}, counted"
            );
        }
    }
}
