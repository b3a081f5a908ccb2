//! Resampling that reproduces Pillow's `Image.resize` bit for bit on 8-bit images, because the
//! model was trained on images Pillow resized: a one-level difference in a pixel is 0.017 after
//! ImageNet normalisation, and one nearest-neighbour index off by one flipped a trained model's
//! top-1 class.
//!
//! Convolution filters (bilinear, bicubic, lanczos3) use the algorithm of Pillow's
//! `libImaging/Resample.c`: separable, horizontal pass first into an 8-bit intermediate, filter
//! support widened by the scale when downscaling, coefficients normalised in f64 then rounded to
//! 22-bit fixed point, accumulation rounded half up and clipped. Nearest neighbour is Pillow's
//! affine scaling (`libImaging/Geometry.c`): source coordinates accumulated in f64, truncated.

/// Fixed-point precision of the coefficients (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's convolution filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
    Lanczos3,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos3 => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos3 => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Per output pixel: first input index, and fixed-point weights of the inputs from there.
struct Coefficients {
    /// (first input index, number of taps) per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output pixel.
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs`: per output pixel, the first input index, the number of taps and
/// the normalised weights (`ksize` slots each), in double precision.
fn float_coefficients(
    in_size: usize,
    out_size: usize,
    filter: Filter,
) -> (Vec<(usize, usize)>, Vec<f64>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0f64; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Pillow truncates toward zero with a C cast.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let k = &mut weights[xx * ksize..xx * ksize + xmax];
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate() {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        if ww != 0.0 {
            for kx in k.iter_mut() {
                *kx /= ww;
            }
        }
        bounds.push((xmin, xmax));
    }
    (bounds, weights, ksize)
}

/// The 8-bit weights: Pillow's `normalize_coeffs_8bpc` of [`float_coefficients`].
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let (bounds, float, ksize) = float_coefficients(in_size, out_size, filter);
    let weights = float
        .iter()
        .map(|&w| {
            let fixed = w * (1i64 << PRECISION_BITS) as f64;
            if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            }
        })
        .collect();
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

/// Resizes a one-channel float image as Pillow resizes mode `F`: each pass sums `value × weight`
/// in double precision over the normalised weights and stores float32; horizontal pass first,
/// over the rows the vertical pass reads.
pub fn resize_f32(
    src: &[f32],
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<f32> {
    assert_eq!(src.len(), w * h, "buffer is width*height: this is a bug");
    let vert = (out_h != h).then(|| float_coefficients(h, out_h, filter));
    let (row_first, row_last) = match &vert {
        Some((bounds, _, _)) => (bounds[0].0, bounds.last().map_or(h, |(start, n)| start + n)),
        None => (0, h),
    };
    let (mid, mid_w, mid_first) = if out_w != w {
        let (bounds, k, ksize) = float_coefficients(w, out_w, filter);
        let mut out = vec![0f32; (row_last - row_first) * out_w];
        for (r, out_row) in out.chunks_exact_mut(out_w).enumerate() {
            let in_row = &src[(row_first + r) * w..(row_first + r + 1) * w];
            for (xx, o) in out_row.iter_mut().enumerate() {
                let (start, n) = bounds[xx];
                let mut ss = 0.0f64;
                for (&p, &kx) in in_row[start..start + n].iter().zip(&k[xx * ksize..]) {
                    ss += f64::from(p) * kx;
                }
                *o = ss as f32;
            }
        }
        (out, out_w, row_first)
    } else {
        (src.to_vec(), w, 0)
    };
    let Some((bounds, k, ksize)) = vert else {
        return mid;
    };
    let mut out = vec![0f32; out_h * mid_w];
    for (yy, out_row) in out.chunks_exact_mut(mid_w).enumerate() {
        let (start, n) = bounds[yy];
        for (xx, o) in out_row.iter_mut().enumerate() {
            let mut ss = 0.0f64;
            for (y, &ky) in k[yy * ksize..yy * ksize + n].iter().enumerate() {
                ss += f64::from(mid[(start + y - mid_first) * mid_w + xx]) * ky;
            }
            *o = ss as f32;
        }
    }
    out
}

#[inline]
fn clip8(acc: i32) -> u8 {
    let v = acc >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel) from `w×h` to `out_w×out_h`.
pub fn resize(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        w * h * channels,
        "buffer is width*height*channels: this is a bug"
    );
    let horizontal = out_w != w;
    let vertical = out_h != h;
    let vert = vertical.then(|| coefficients(h, out_h, filter));
    // Only the input rows the vertical pass reads are resampled horizontally.
    let (row_first, row_last) = match &vert {
        Some(c) => {
            let first = c.bounds[0].0;
            let last = c.bounds.last().map_or(h, |(start, n)| start + n);
            (first, last)
        }
        None => (0, h),
    };
    let (mid, mid_w, mid_first) = if horizontal {
        let coeffs = coefficients(w, out_w, filter);
        let fixed = FixedWindows::new(&coeffs, w);
        let rows = row_last - row_first;
        let mut out = vec![0u8; rows * out_w * channels];
        for (r, out_row) in out.chunks_exact_mut(out_w * channels).enumerate() {
            let in_row = &src[(row_first + r) * w * channels..(row_first + r + 1) * w * channels];
            let done = match (&fixed, channels) {
                (Some(f), 1) => f.row1(in_row, out_row),
                (Some(f), 3) => f.row3(in_row, out_row),
                _ => false,
            };
            if !done {
                horizontal_row(in_row, out_row, channels, &coeffs);
            }
        }
        (out, out_w, row_first)
    } else {
        (src.to_vec(), w, 0)
    };
    let Some(coeffs) = vert else { return mid };
    let stride = mid_w * channels;
    let mut out = vec![0u8; out_h * stride];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (start, n) = coeffs.bounds[yy];
        let k = &coeffs.weights[yy * coeffs.ksize..yy * coeffs.ksize + n];
        acc.fill(half);
        for (y, &ky) in k.iter().enumerate() {
            let row = start + y - mid_first;
            let in_row = &mid[row * stride..(row + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a += p as i32 * ky;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// The horizontal coefficients re-laid as windows of exactly `ksize` taps (windows at the right
/// edge start earlier, with zero weights in front), so the inner loops have a fixed, unrollable
/// length. The same products are summed, plus products with zero weights: identical results.
struct FixedWindows {
    ksize: usize,
    starts: Vec<usize>,
    weights: Vec<i32>,
}

impl FixedWindows {
    fn new(c: &Coefficients, in_size: usize) -> Option<Self> {
        if in_size < c.ksize {
            return None;
        }
        let mut starts = Vec::with_capacity(c.bounds.len());
        let mut weights = vec![0i32; c.bounds.len() * c.ksize];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let start = xmin.min(in_size - c.ksize);
            let offset = xmin - start;
            debug_assert!(offset + n <= c.ksize);
            weights[xx * c.ksize + offset..xx * c.ksize + offset + n]
                .copy_from_slice(&c.weights[xx * c.ksize..xx * c.ksize + n]);
            starts.push(start);
        }
        Some(FixedWindows {
            ksize: c.ksize,
            starts,
            weights,
        })
    }

    /// One gray row; false if `ksize` has no specialised loop.
    fn row1(&self, in_row: &[u8], out_row: &mut [u8]) -> bool {
        match self.ksize {
            3 => self.gray::<3>(in_row, out_row),
            5 => self.gray::<5>(in_row, out_row),
            7 => self.gray::<7>(in_row, out_row),
            9 => self.gray::<9>(in_row, out_row),
            _ => return false,
        }
        true
    }

    /// One RGB row; false if `ksize` has no specialised loop.
    fn row3(&self, in_row: &[u8], out_row: &mut [u8]) -> bool {
        match self.ksize {
            3 => self.rgb::<3>(in_row, out_row),
            5 => self.rgb::<5>(in_row, out_row),
            7 => self.rgb::<7>(in_row, out_row),
            9 => self.rgb::<9>(in_row, out_row),
            _ => return false,
        }
        true
    }

    fn gray<const K: usize>(&self, in_row: &[u8], out_row: &mut [u8]) {
        let half = 1i32 << (PRECISION_BITS - 1);
        for ((o, &start), k) in out_row
            .iter_mut()
            .zip(&self.starts)
            .zip(self.weights.chunks_exact(K))
        {
            let taps: &[u8; K] = in_row[start..start + K]
                .try_into()
                .expect("window inside the row");
            let k: &[i32; K] = k.try_into().expect("K weights per window");
            let mut s = half;
            for i in 0..K {
                s += taps[i] as i32 * k[i];
            }
            *o = clip8(s);
        }
    }

    fn rgb<const K: usize>(&self, in_row: &[u8], out_row: &mut [u8]) {
        let half = 1i32 << (PRECISION_BITS - 1);
        for ((o, &start), k) in out_row
            .chunks_exact_mut(3)
            .zip(&self.starts)
            .zip(self.weights.chunks_exact(K))
        {
            let taps = &in_row[start * 3..(start + K) * 3];
            let k: &[i32; K] = k.try_into().expect("K weights per window");
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for i in 0..K {
                s0 += taps[3 * i] as i32 * k[i];
                s1 += taps[3 * i + 1] as i32 * k[i];
                s2 += taps[3 * i + 2] as i32 * k[i];
            }
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    }
}

fn horizontal_row(in_row: &[u8], out_row: &mut [u8], channels: usize, c: &Coefficients) {
    let half = 1i32 << (PRECISION_BITS - 1);
    for (xx, out_px) in out_row.chunks_exact_mut(channels).enumerate() {
        let (start, n) = c.bounds[xx];
        let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
        let taps = &in_row[start * channels..(start + n) * channels];
        if channels == 1 {
            let mut s = half;
            for (&p, &kx) in taps.iter().zip(k) {
                s += p as i32 * kx;
            }
            out_px[0] = clip8(s);
        } else {
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for (p, &kx) in taps.chunks_exact(3).zip(k) {
                s0 += p[0] as i32 * kx;
                s1 += p[1] as i32 * kx;
                s2 += p[2] as i32 * kx;
            }
            out_px[0] = clip8(s0);
            out_px[1] = clip8(s1);
            out_px[2] = clip8(s2);
        }
    }
}

/// Nearest-neighbour resize of interleaved 8-bit pixels, as Pillow's `Image.resize(NEAREST)`:
/// the source coordinate starts at half a step and is advanced by repeated addition of the step
/// `in / out` in f64, then truncated. (Computing `floor((i + 0.5) * in / out)` directly differs
/// from Pillow where the accumulated sum rounds across an integer.)
pub fn nearest<T: Copy>(
    src: &[T],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<T> {
    assert_eq!(
        src.len(),
        w * h * channels,
        "buffer is width*height*channels: this is a bug"
    );
    let xs = nearest_indices(w, out_w);
    let ys = nearest_indices(h, out_h);
    let mut out = Vec::with_capacity(out_w * out_h * channels);
    for &y in &ys {
        let row = &src[y * w * channels..(y + 1) * w * channels];
        if channels == 1 {
            out.extend(xs.iter().map(|&x| row[x]));
        } else {
            for &x in &xs {
                out.extend_from_slice(&row[x * channels..(x + 1) * channels]);
            }
        }
    }
    out
}

/// Source index of each output index, by Pillow's accumulation (`ImagingScaleAffine`).
fn nearest_indices(in_size: usize, out_size: usize) -> Vec<usize> {
    let step = in_size as f64 / out_size as f64;
    let mut at = step * 0.5;
    (0..out_size)
        .map(|_| {
            // `at` is never negative here; the `min` only guards against a bug.
            let index = (at as usize).min(in_size - 1);
            at += step;
            index
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
            for (i, o) in [(512, 256), (256, 512), (300, 256), (7, 3)] {
                let c = coefficients(i, o, filter);
                for xx in 0..o {
                    let sum: i64 = c.weights[xx * c.ksize..(xx + 1) * c.ksize]
                        .iter()
                        .map(|&w| w as i64)
                        .sum();
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= c.ksize as i64,
                        "{filter:?} {i}->{o}"
                    );
                }
            }
        }
    }

    #[test]
    fn fixed_windows_equal_the_generic_loop() {
        // Pseudo-random rows; sizes with windows clipped at both edges, up- and downscaling.
        let mut x = 12345u32;
        let row: Vec<u8> = (0..600 * 3)
            .map(|_| {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            for (w, out_w) in [(512, 256), (300, 256), (600, 200), (100, 256), (17, 5)] {
                let c = coefficients(w, out_w, filter);
                let fixed = FixedWindows::new(&c, w).unwrap();
                for channels in [1, 3] {
                    let input = &row[..w * channels];
                    let mut a = vec![0u8; out_w * channels];
                    let mut b = vec![0u8; out_w * channels];
                    let specialised = if channels == 1 {
                        fixed.row1(input, &mut a)
                    } else {
                        fixed.row3(input, &mut a)
                    };
                    if !specialised {
                        assert!(c.ksize > 9, "ksize {} should be specialised", c.ksize);
                        continue;
                    }
                    horizontal_row(input, &mut b, channels, &c);
                    assert_eq!(a, b, "{filter:?} {w}->{out_w} x{channels}");
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 40 * 30 * 3];
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
            let out = resize(&src, 40, 30, 3, 17, 23, filter);
            assert!(out.iter().all(|&p| p == 77), "{filter:?}");
        }
    }

    #[test]
    fn nearest_accumulates_like_pillow() {
        // Where the accumulated f64 sum and the direct product truncate differently, Pillow
        // follows the sum: find such a case and check that we do too.
        let (w, out_w) = (512, 150);
        let step = w as f64 / out_w as f64;
        let direct: Vec<usize> = (0..out_w)
            .map(|i| ((i as f64 + 0.5) * step) as usize)
            .collect();
        let ours = nearest_indices(w, out_w);
        assert_eq!(ours.len(), out_w);
        assert!(ours.iter().all(|&i| i < w));
        assert!(
            ours.iter().zip(&direct).all(|(a, b)| a.abs_diff(*b) <= 1),
            "never more than one index apart"
        );
        let src: Vec<u8> = (0..w * 3).map(|i| (i % 251) as u8).collect();
        let out = nearest(&src, w, 1, 3, out_w, 1);
        for (o, &x) in out.chunks(3).zip(&ours) {
            assert_eq!(o, &src[x * 3..x * 3 + 3]);
        }
    }

    #[test]
    fn halving_bilinear_averages_pairs_like_pillow() {
        // Pillow 12: Image.frombytes("L", (4, 1), bytes([0, 100, 200, 50])).resize((2, 1), BILINEAR)
        // gives [71, 121] (support widened to 2, window truncated at the border).
        let out = resize(&[0, 100, 200, 50], 4, 1, 1, 2, 1, Filter::Bilinear);
        assert_eq!(out, [71, 121]);
    }
}
