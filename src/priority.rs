//! The urgency of a request: shared vocabulary of the front ends, the model configuration, the
//! batcher and the metrics, so it sits below all of them.

/// Urgency of a request. The batcher fills each batch from the highest waiting priority first, and
/// each priority has its own queue limit, so routine floods cannot starve urgent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Urgent ("stat") reads: served first.
    Stat,
    /// Everything else.
    Routine,
}

impl Priority {
    /// Highest first.
    pub const ALL: [Priority; 2] = [Priority::Stat, Priority::Routine];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Stat => "stat",
            Priority::Routine => "routine",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stat" => Ok(Priority::Stat),
            "routine" => Ok(Priority::Routine),
            // Caller text, so bounded (and the error that carries it is never logged).
            _ => Err(format!(
                "unknown priority {}: use stat or routine",
                crate::error::echo(s)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_priority_is_echoed_bounded() {
        assert_eq!("stat".parse::<Priority>(), Ok(Priority::Stat));
        let long = "x".repeat(20_000);
        let e = long.parse::<Priority>().unwrap_err();
        assert!(e.len() < 150, "{} bytes echoed", e.len());
        assert!(e.contains("stat or routine"), "{e}");
    }
}
