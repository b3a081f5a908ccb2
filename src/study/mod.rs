//! A DICOM study as a segmentation model's input: its instances grouped into series, each series'
//! sequence detected from its headers (or named by the caller), the model's channels matched to
//! series, and every reference slice (the first channel's series defines the output grid) paired
//! with a slice of each other channel's series, in patient coordinates. Headers only: nothing
//! here decodes pixels, so a study is checked whole before any decoding is paid for.
//!
//! No silent mixing: a series is usable only when it shares the reference's Frame of Reference
//! UID and plane orientation (within [`geometry::ORIENTATION_TOLERANCE_DEG`]); a reference slice
//! with no partner within half a slice spacing in some series is reported as not segmented, never
//! filled in. Series already on the reference's grid (BraTS exports, one multi-echo acquisition)
//! are paired exactly and their pixels used as they are ([`Partner::Exact`]).
//!
//! Errors name series by Series Instance UID and instances by their index in the request, never
//! by description text or any patient attribute.

pub mod geometry;
pub mod measure;
pub mod resample;

use std::collections::HashMap;

use crate::error::{ErrorKind, InferError};
use crate::input::dicom::Header;
use crate::input::sequence::{Sequence, detect};
use crate::model::{DicomGuard, GuardPolicy};
use geometry::{Orientation, Plane, SAME_POSITION_MM, median_step};

/// How a slice of another series is brought to a reference slice's position along the normal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interpolation {
    /// The nearest slice, within half that series' slice spacing.
    #[default]
    Nearest,
    /// Linear between the two slices either side (nearest at the ends, within half a spacing).
    Linear,
}

/// Where a reference slice's image of one channel comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partner {
    /// That instance's pixels as they are (the same pixel grid: no resampling).
    Exact(usize),
    /// That instance resampled onto the reference slice's grid.
    Nearest(usize),
    /// `(1 − w)·a + w·b` of two instances, each resampled onto the reference grid.
    Linear(usize, usize, f64),
}

/// One series the plan uses, in the model's channel order.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelSeries {
    pub sequence: Sequence,
    pub series_instance_uid: String,
    /// Its instances (request indices), sorted along the reference normal.
    pub instances: Vec<usize>,
    /// How its sequence was known: the header rule that matched, or "named by the caller".
    pub because: String,
    /// Every partner of this series is exact.
    pub exact: bool,
}

/// One slice of the reference series: a slice of the output, and its partners.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceSlice {
    /// Request index of its instance.
    pub instance: usize,
    pub plane: Plane,
    /// Position along the reference normal, in mm.
    pub along: f64,
    /// One per channel (the first: the slice itself); `None` where a series has no slice here.
    pub partners: Vec<Option<Partner>>,
}

impl ReferenceSlice {
    /// Whether every channel has an image for this slice.
    pub fn complete(&self) -> bool {
        self.partners.iter().all(Option::is_some)
    }
}

/// Where the spacing between slices (the voxel depth) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthFrom {
    Positions,
    SliceThickness,
}

/// A study made ready to segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub study_instance_uid: String,
    pub frame_of_reference_uid: String,
    pub channels: Vec<ChannelSeries>,
    pub slices: Vec<ReferenceSlice>,
    /// Voxel depth in mm, and where it came from.
    pub depth: Option<(f64, DepthFrom)>,
    pub warnings: Vec<String>,
}

/// What the caller says about the study.
#[derive(Debug, Clone, Default)]
pub struct StudyOptions {
    /// Series Instance UID → sequence, for series whose headers do not say (or say wrongly).
    pub named: Vec<(String, Sequence)>,
    pub interpolation: Interpolation,
}

fn invalid(message: String) -> InferError {
    InferError::invalid(message)
}

/// A series as the headers group it.
struct Series {
    uid: String,
    instances: Vec<usize>,
}

/// Plans the segmentation of a study of `headers` (request order) for a model of `channels`.
pub fn plan(
    headers: &[Header],
    channels: &[Sequence],
    guard: Option<&DicomGuard>,
    options: &StudyOptions,
) -> Result<Plan, InferError> {
    let first = headers
        .first()
        .ok_or_else(|| invalid("the study has no instances".into()))?;
    let study = first.ids.study_instance_uid.clone();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut series: Vec<Series> = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        if h.ids.study_instance_uid != study {
            return Err(invalid(format!(
                "instance {i} belongs to another study than instance 0 (its Study Instance UID \
                 differs): send one study per call"
            )));
        }
        if h.geometry.patient_key != first.geometry.patient_key {
            return Err(invalid(format!(
                "instance {i} is of another patient than instance 0 (its Patient ID differs): \
                 send one patient's study per call"
            )));
        }
        if let Some(j) = seen.insert(&h.ids.sop_instance_uid, i) {
            return Err(invalid(format!(
                "instance {i} is the same SOP instance as instance {j} (SOP Instance UID {}): \
                 each instance once",
                h.ids.sop_instance_uid
            )));
        }
        if h.frames > 1 {
            return Err(invalid(format!(
                "instance {i} (series {}) has {} frames: a study takes single-frame instances",
                h.ids.series_instance_uid, h.frames
            )));
        }
        match series
            .iter_mut()
            .find(|s| s.uid == h.ids.series_instance_uid)
        {
            Some(s) => s.instances.push(i),
            None => series.push(Series {
                uid: h.ids.series_instance_uid.clone(),
                instances: vec![i],
            }),
        }
    }
    for (uid, _) in &options.named {
        if !series.iter().any(|s| &s.uid == uid) {
            return Err(invalid(format!(
                "series {} is named, but no instance of the study belongs to it",
                crate::error::echo(uid)
            ))
            .quoting_caller());
        }
    }
    let mut warnings = Vec::new();
    // Each series' sequence: named by the caller, else from its first instance's header.
    let mut candidates: Vec<Vec<(usize, String)>> = vec![Vec::new(); channels.len()];
    for (k, s) in series.iter().enumerate() {
        let header = &headers[s.instances[0]];
        if let Some(guard) = guard
            && !guard.modalities.is_empty()
            && !guard.modalities.contains(&header.modality)
        {
            let message = format!(
                "series {} is {:?}, not {}",
                s.uid,
                header.modality,
                guard.modalities.join(" or ")
            );
            match guard.policy {
                GuardPolicy::Reject => {
                    return Err(InferError::new(
                        ErrorKind::FailedPrecondition,
                        format!("{message}: the model takes no other modality"),
                    ));
                }
                GuardPolicy::Warn => {
                    warnings.push(format!("{message}: left out"));
                    continue;
                }
            }
        }
        let (sequence, because) = match options.named.iter().find(|(uid, _)| uid == &s.uid) {
            Some((_, sequence)) => (*sequence, "named by the caller".to_string()),
            None => {
                let detected = detect(&header.acquisition);
                (detected.sequence, detected.because.to_string())
            }
        };
        match channels.iter().position(|&c| c == sequence) {
            Some(c) => candidates[c].push((k, because)),
            None if sequence == Sequence::Unknown => warnings.push(format!(
                "series {}: its sequence could not be identified ({because}); left out (name it \
                 to use it)",
                s.uid
            )),
            None => warnings.push(format!(
                "series {} is {} ({because}), which the model does not take: left out",
                s.uid,
                sequence.as_str()
            )),
        }
    }
    let mut chosen = Vec::with_capacity(channels.len());
    for (c, found) in candidates.into_iter().enumerate() {
        let sequence = channels[c];
        match &found[..] {
            [one] => chosen.push(one.clone()),
            [] => {
                return Err(invalid(format!(
                    "the study has no {} series (the model takes {}; {}): name the series if its \
                     headers do not say",
                    sequence.as_str(),
                    channels
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    describe(&series, headers, options)
                )));
            }
            several => {
                return Err(invalid(format!(
                    "series {} are each {}: name the one to use (or send one)",
                    several
                        .iter()
                        .map(|(k, _)| series[*k].uid.as_str())
                        .collect::<Vec<_>>()
                        .join(" and "),
                    sequence.as_str()
                )));
            }
        }
    }
    // Each chosen series' slices, sorted along the reference normal.
    let reference = &series[chosen[0].0];
    let reference_planes = planes(reference, headers)?;
    let orientation = reference_planes[0].1.orientation;
    let normal = orientation.normal;
    let frame_of_reference = headers[reference.instances[0]]
        .geometry
        .frame_of_reference_uid
        .clone();
    if frame_of_reference.is_empty() {
        return Err(invalid(format!(
            "series {} has no Frame of Reference UID: its slices cannot be placed in patient \
             coordinates",
            reference.uid
        )));
    }
    let mut sorted: Vec<Vec<(usize, Plane, f64)>> = Vec::with_capacity(channels.len());
    for (c, (k, _)) in chosen.iter().enumerate() {
        let s = &series[*k];
        let planes = if c == 0 {
            reference_planes.clone()
        } else {
            planes(s, headers)?
        };
        let own = &planes[0].1;
        if c > 0 {
            let their = &headers[s.instances[0]].geometry.frame_of_reference_uid;
            if their != &frame_of_reference {
                return Err(InferError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "series {} is not co-registered with the reference {} series {}: another \
                         Frame of Reference UID; register the series upstream",
                        s.uid,
                        channels[0].as_str(),
                        reference.uid
                    ),
                ));
            }
            if !orientation.matches(&own.orientation) {
                return Err(InferError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "series {} is oriented {:.1}° from the reference {} series {} (at most \
                         {}° is taken as the same plane): reformat or register it upstream",
                        s.uid,
                        orientation.angle_deg(&own.orientation),
                        channels[0].as_str(),
                        reference.uid,
                        geometry::ORIENTATION_TOLERANCE_DEG
                    ),
                ));
            }
        }
        let mut along: Vec<(usize, Plane, f64)> = planes
            .into_iter()
            .map(|(i, p)| (i, p, p.along(normal)))
            .collect();
        along.sort_by(|a, b| a.2.total_cmp(&b.2));
        if let Some(w) = along
            .windows(2)
            .find(|w| (w[1].2 - w[0].2).abs() <= SAME_POSITION_MM)
        {
            return Err(invalid(format!(
                "series {}: instances {} and {} are at the same position: one slice per position \
                 (send one echo or one acquisition per series)",
                s.uid, w[0].0, w[1].0
            )));
        }
        sorted.push(along);
    }
    // Pair every reference slice with each other series' slice.
    let steps: Vec<Option<f64>> = sorted
        .iter()
        .map(|s| median_step(&s.iter().map(|x| x.2).collect::<Vec<_>>()))
        .collect();
    let mut slices = Vec::with_capacity(sorted[0].len());
    for &(instance, plane, along) in &sorted[0] {
        let mut partners = vec![Some(Partner::Exact(instance))];
        for (c, other) in sorted.iter().enumerate().skip(1) {
            let half = match steps[c] {
                Some(step) => step / 2.0,
                None => headers[other[0].0]
                    .geometry
                    .slice_thickness
                    .map_or(SAME_POSITION_MM, |t| t / 2.0),
            } + 1e-6;
            partners.push(partner(other, &plane, along, half, options.interpolation));
        }
        slices.push(ReferenceSlice {
            instance,
            plane,
            along,
            partners,
        });
    }
    let channels_out = chosen
        .iter()
        .enumerate()
        .map(|(c, (k, because))| ChannelSeries {
            sequence: channels[c],
            series_instance_uid: series[*k].uid.clone(),
            instances: sorted[c].iter().map(|x| x.0).collect(),
            because: because.clone(),
            exact: slices
                .iter()
                .all(|s| matches!(s.partners[c], Some(Partner::Exact(_)))),
        })
        .collect();
    let missing = slices.iter().filter(|s| !s.complete()).count();
    if missing > 0 {
        warnings.push(format!(
            "{missing} of {} reference slices have no partner in every series and are not \
             segmented",
            slices.len()
        ));
    }
    let depth = match steps[0] {
        Some(step) => Some((step, DepthFrom::Positions)),
        None => headers[sorted[0][0].0]
            .geometry
            .slice_thickness
            .map(|t| (t, DepthFrom::SliceThickness)),
    };
    if let Some((_, DepthFrom::SliceThickness)) = depth {
        warnings.push(
            "the reference series has one slice: volumes use its Slice Thickness as the voxel \
             depth"
                .into(),
        );
    }
    Ok(Plan {
        study_instance_uid: study,
        frame_of_reference_uid: frame_of_reference,
        channels: channels_out,
        slices,
        depth,
        warnings,
    })
}

/// The partner of a reference slice at `along` in `other` (sorted along the reference normal).
fn partner(
    other: &[(usize, Plane, f64)],
    plane: &Plane,
    along: f64,
    half: f64,
    interpolation: Interpolation,
) -> Option<Partner> {
    let nearest = other
        .iter()
        .min_by(|a, b| (a.2 - along).abs().total_cmp(&(b.2 - along).abs()))?;
    if nearest.1.same_grid(plane) {
        return Some(Partner::Exact(nearest.0));
    }
    if (nearest.2 - along).abs() > half {
        return None;
    }
    // Linear only between two slices; past either end, the nearest (within half a spacing).
    if interpolation == Interpolation::Linear
        && let Some(after) = other.iter().position(|x| x.2 >= along)
        && after > 0
    {
        let (a, b) = (&other[after - 1], &other[after]);
        let w = (along - a.2) / (b.2 - a.2);
        return Some(Partner::Linear(a.0, b.0, w));
    }
    Some(Partner::Nearest(nearest.0))
}

/// The plane of a single-frame instance, when its header places it.
pub fn plane_of(header: &Header) -> Option<Plane> {
    let g = &header.geometry;
    Some(Plane {
        origin: g.position?,
        orientation: Orientation::new(g.orientation?)?,
        spacing: g.pixel_spacing?,
        rows: header.rows,
        columns: header.columns,
    })
}

/// Each instance of a series with its plane; refuses an instance that cannot be placed or does
/// not match the series' first.
fn planes(series: &Series, headers: &[Header]) -> Result<Vec<(usize, Plane)>, InferError> {
    let mut out: Vec<(usize, Plane)> = Vec::with_capacity(series.instances.len());
    for &i in &series.instances {
        let h = &headers[i];
        let g = &h.geometry;
        let missing = if g.position.is_none() {
            Some("Image Position (Patient)")
        } else if g.orientation.is_none() {
            Some("Image Orientation (Patient)")
        } else if g.pixel_spacing.is_none() {
            Some("Pixel Spacing")
        } else {
            None
        };
        if let Some(what) = missing {
            return Err(invalid(format!(
                "series {}: instance {i} has no usable {what}: a study's slices are aligned in \
                 patient coordinates",
                series.uid
            )));
        }
        let orientation = Orientation::new(g.orientation.expect("checked")).ok_or_else(|| {
            invalid(format!(
                "series {}: instance {i} has an Image Orientation (Patient) that is not two \
                 perpendicular directions",
                series.uid
            ))
        })?;
        let plane = Plane {
            origin: g.position.expect("checked"),
            orientation,
            spacing: g.pixel_spacing.expect("checked"),
            rows: h.rows,
            columns: h.columns,
        };
        if let Some((_, first)) = out.first() {
            let differs = if (first.rows, first.columns) != (plane.rows, plane.columns) {
                Some("size")
            } else if !first.orientation.matches(&plane.orientation) {
                Some("orientation")
            } else if (0..2)
                .any(|k| (first.spacing[k] - plane.spacing[k]).abs() > geometry::SAME_SPACING_MM)
            {
                Some("pixel spacing")
            } else if h.geometry.frame_of_reference_uid
                != headers[series.instances[0]].geometry.frame_of_reference_uid
            {
                Some("Frame of Reference UID")
            } else {
                None
            };
            if let Some(what) = differs {
                return Err(invalid(format!(
                    "series {}: instance {i} has another {what} than instance {}: a series is \
                     one stack of slices",
                    series.uid, series.instances[0]
                )));
            }
        }
        out.push((i, plane));
    }
    Ok(out)
}

/// The study's series as the error for a missing sequence lists them: UID and what was found.
fn describe(series: &[Series], headers: &[Header], options: &StudyOptions) -> String {
    let found: Vec<String> = series
        .iter()
        .map(|s| {
            let sequence = match options.named.iter().find(|(uid, _)| uid == &s.uid) {
                Some((_, sequence)) => sequence.as_str(),
                None => detect(&headers[s.instances[0]].acquisition)
                    .sequence
                    .as_str(),
            };
            format!("series {}: {sequence}", s.uid)
        })
        .collect();
    format!("found {}", found.join(", "))
}

#[cfg(test)]
mod tests;
