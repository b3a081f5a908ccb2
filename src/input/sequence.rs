//! Which MR sequence a series is, from its header alone: the guard that keeps a FLAIR-trained
//! model from classifying a T1 series. The rules, in order (README, "Sequence guard"):
//!
//! 1. **Descriptions.** Series Description, Protocol Name and Sequence Name, upper-cased, split
//!    into words at anything but letters, digits, `+` and `*`:
//!    - FLAIR: a word `FLAIR` or starting with `FLAIR`, `DARKFLUID`/`DARK`+`FLUID`, `TIRM`,
//!      `FLUID`+`ATTENUATED`;
//!    - T1: `T1`, `T1W`, `T1WI`, words starting with `T1` (`T1_SE`, …), `MPRAGE`, `SPGR`,
//!      `FSPGR`, `BRAVO`, `VIBE`, `MPR`; T1c when a contrast word is present too (`+C`, `C+`,
//!      `POST`, `GD`, `GAD`, `GADO`, `CONTRAST`, `CE`, `+GD`, `+CONTRAST`) or the Contrast/Bolus
//!      Agent is set;
//!    - T2: `T2`, `T2W`, `T2WI`, words starting with `T2` other than `T2*` (a gradient-echo T2*
//!      is not a T2).
//!    - order: FLAIR is checked first ("T2 FLAIR" is FLAIR); words of two kinds (e.g. "T1 T2")
//!      make the descriptions ambiguous and rule 2 decides.
//! 2. **Physics**, when the descriptions say nothing or are ambiguous: inversion recovery with
//!    TI ≥ 1500 ms and TE ≥ 80 ms is FLAIR; inversion recovery with TI < 1500 ms and TE < 30 ms is
//!    T1; no inversion, TE ≥ 80 ms and TR ≥ 2000 ms is T2; no inversion, TE < 30 ms and
//!    TR < 1000 ms is T1. A T1 with a Contrast/Bolus Agent is T1c.
//! 3. Otherwise: unknown.

use super::dicom::Acquisition;

/// An MR sequence, as far as the guard can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Sequence {
    #[serde(rename = "FLAIR")]
    Flair,
    #[serde(rename = "T1")]
    T1,
    #[serde(rename = "T1c")]
    T1c,
    #[serde(rename = "T2")]
    T2,
    #[serde(rename = "unknown")]
    Unknown,
}

impl Sequence {
    pub fn as_str(self) -> &'static str {
        match self {
            Sequence::Flair => "FLAIR",
            Sequence::T1 => "T1",
            Sequence::T1c => "T1c",
            Sequence::T2 => "T2",
            Sequence::Unknown => "unknown",
        }
    }
}

/// What was detected and on what grounds (for messages; no header text is quoted).
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub sequence: Sequence,
    pub because: &'static str,
}

const CONTRAST_WORDS: &[&str] = &[
    "+C",
    "C+",
    "POST",
    "GD",
    "GAD",
    "GADO",
    "CONTRAST",
    "CE",
    "+GD",
    "+CONTRAST",
    "POSTGD",
];

fn words(a: &Acquisition) -> Vec<String> {
    [&a.series_description, &a.protocol_name, &a.sequence_name]
        .iter()
        .flat_map(|text| {
            text.to_uppercase()
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '*'))
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Labels the series FLAIR, T1, T1c, T2 or unknown.
pub fn detect(a: &Acquisition) -> Detected {
    let words = words(a);
    let has = |w: &str| words.iter().any(|x| x == w);
    let contrast = !a.contrast_agent.trim().is_empty()
        || words.iter().any(|w| CONTRAST_WORDS.contains(&w.as_str()));
    let flair = words
        .iter()
        .any(|w| w.starts_with("FLAIR") || w == "TIRM" || w == "DARKFLUID")
        || (has("DARK") && has("FLUID"))
        || (has("FLUID") && has("ATTENUATED"));
    if flair {
        return Detected {
            sequence: Sequence::Flair,
            because: "the series description names FLAIR",
        };
    }
    let t1 = words.iter().any(|w| {
        w.starts_with("T1")
            || ["MPRAGE", "SPGR", "FSPGR", "BRAVO", "VIBE", "MPR"].contains(&w.as_str())
    });
    let t2 = words
        .iter()
        .any(|w| w.starts_with("T2") && !w.starts_with("T2*"));
    match (t1, t2) {
        (true, false) if contrast => {
            return Detected {
                sequence: Sequence::T1c,
                because: "the series description names a T1 with contrast",
            };
        }
        (true, false) => {
            return Detected {
                sequence: Sequence::T1,
                because: "the series description names a T1",
            };
        }
        (false, true) => {
            return Detected {
                sequence: Sequence::T2,
                because: "the series description names a T2",
            };
        }
        _ => {}
    }
    let (ti, te, tr) = (a.inversion_time_ms, a.echo_time_ms, a.repetition_time_ms);
    let t1_or_t1c = |because| Detected {
        sequence: if a.contrast_agent.trim().is_empty() {
            Sequence::T1
        } else {
            Sequence::T1c
        },
        because,
    };
    if a.inversion_recovery {
        match (ti, te) {
            (Some(ti), Some(te)) if ti >= 1500.0 && te >= 80.0 => {
                return Detected {
                    sequence: Sequence::Flair,
                    because: "inversion recovery with a long inversion time and a long echo time",
                };
            }
            (Some(ti), Some(te)) if ti < 1500.0 && te < 30.0 => {
                return t1_or_t1c("inversion recovery with a short inversion and echo time");
            }
            _ => {}
        }
    } else {
        match (te, tr) {
            (Some(te), Some(tr)) if te >= 80.0 && tr >= 2000.0 => {
                return Detected {
                    sequence: Sequence::T2,
                    because: "a long echo time and repetition time without inversion",
                };
            }
            (Some(te), Some(tr)) if te < 30.0 && tr < 1000.0 => {
                return t1_or_t1c("a short echo time and repetition time without inversion");
            }
            _ => {}
        }
    }
    Detected {
        sequence: Sequence::Unknown,
        because: "neither the descriptions nor the timing parameters identify the sequence",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(text: &str) -> Acquisition {
        Acquisition {
            series_description: text.into(),
            ..Default::default()
        }
    }

    fn timed(ir: bool, ti: Option<f64>, te: f64, tr: f64) -> Acquisition {
        Acquisition {
            inversion_recovery: ir,
            inversion_time_ms: ti,
            echo_time_ms: Some(te),
            repetition_time_ms: Some(tr),
            ..Default::default()
        }
    }

    #[test]
    fn descriptions_of_each_kind() {
        use Sequence::*;
        for (text, expected) in [
            ("AX FLAIR", Flair),
            ("AX T2 FLAIR", Flair),
            ("t2_tirm_tra_dark-fluid", Flair),
            ("Sag 3D FLAIR CUBE", Flair),
            ("FLAIR_3D", Flair),
            ("AX T1", T1),
            ("t1_mprage_sag", T1),
            ("AX T1 SE", T1),
            ("Sag FSPGR BRAVO", T1),
            ("AX T1 POST GD", T1c),
            ("AX T1 +C", T1c),
            ("t1_mprage_tra_CE", T1c),
            ("AX T2", T2),
            ("t2_tse_tra", T2),
            ("AX T2WI", T2),
            ("AX T2* GRE", Unknown),
            ("DWI b1000", Unknown),
            ("AX T1 T2 combo", Unknown),
            ("", Unknown),
        ] {
            assert_eq!(detect(&described(text)).sequence, expected, "{text:?}");
        }
    }

    #[test]
    fn other_description_fields_and_the_contrast_agent() {
        let a = Acquisition {
            protocol_name: "BRAIN t1_se_tra".into(),
            contrast_agent: "GADOTERATE".into(),
            ..Default::default()
        };
        assert_eq!(detect(&a).sequence, Sequence::T1c);
        let a = Acquisition {
            sequence_name: "*tir2d1_16".into(),
            series_description: "AX FLAIR".into(),
            ..Default::default()
        };
        assert_eq!(detect(&a).sequence, Sequence::Flair);
    }

    #[test]
    fn timing_decides_when_the_descriptions_do_not() {
        assert_eq!(
            detect(&timed(true, Some(2500.0), 120.0, 9000.0)).sequence,
            Sequence::Flair
        );
        assert_eq!(
            detect(&timed(true, Some(900.0), 10.0, 2000.0)).sequence,
            Sequence::T1
        );
        assert_eq!(
            detect(&timed(false, None, 100.0, 4000.0)).sequence,
            Sequence::T2
        );
        assert_eq!(
            detect(&timed(false, None, 12.0, 500.0)).sequence,
            Sequence::T1
        );
        let mut t1c = timed(false, None, 12.0, 500.0);
        t1c.contrast_agent = "GD".into();
        assert_eq!(detect(&t1c).sequence, Sequence::T1c);
        // Intermediate (proton density) and IR without TI: unknown.
        assert_eq!(
            detect(&timed(false, None, 30.0, 3000.0)).sequence,
            Sequence::Unknown
        );
        assert_eq!(
            detect(&timed(true, None, 120.0, 9000.0)).sequence,
            Sequence::Unknown
        );
        // An ambiguous description falls back to timing.
        let mut a = timed(true, Some(2200.0), 90.0, 8000.0);
        a.series_description = "T1 T2".into();
        assert_eq!(detect(&a).sequence, Sequence::Flair);
    }
}
