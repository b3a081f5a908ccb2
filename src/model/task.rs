//! Postprocessing: what a model's raw output means. Classification is the one task today: scores
//! (logits or probabilities) become label probabilities and a top label. Segmentation masks would
//! be a second task here, with the batcher and backends unchanged.

use super::{ModelSpec, OutputKind};

/// One image's classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// Index into the model's labels of the most probable class.
    pub best: usize,
    /// Probability of each label, in label order.
    pub probabilities: Vec<f32>,
}

/// Turns a classifier's output into [`Classification`]s.
#[derive(Debug, Clone)]
pub struct Classifier {
    labels: Vec<String>,
    kind: OutputKind,
}

impl Classifier {
    pub fn new(spec: &ModelSpec) -> Self {
        Classifier {
            labels: spec.config.labels.clone(),
            kind: spec.config.output_kind,
        }
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Values of the model's output per image.
    pub fn output_len(&self) -> usize {
        self.labels.len()
    }

    /// `scores`: one image's output (`output_len` values).
    pub fn classify(&self, scores: &[f32]) -> Classification {
        let probabilities = match self.kind {
            OutputKind::Logits => softmax(scores),
            OutputKind::Probabilities => scores.to_vec(),
        };
        let best = probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        Classification {
            best,
            probabilities,
        }
    }
}

/// Numerically stable softmax, accumulated in f64.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable() {
        assert_eq!(softmax(&[1000.0, 1000.0]), [0.5, 0.5]);
        let p = softmax(&[0.0, (3.0f32).ln()]);
        assert!((p[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn picks_the_most_probable_label() {
        let logits = Classifier {
            labels: vec!["a".into(), "b".into(), "c".into()],
            kind: OutputKind::Logits,
        };
        let c = logits.classify(&[0.0, 2.0, 1.0]);
        assert_eq!(c.best, 1);
        assert!((c.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let probs = Classifier {
            kind: OutputKind::Probabilities,
            ..logits
        };
        let c = probs.classify(&[0.2, 0.1, 0.7]);
        assert_eq!((c.best, c.probabilities), (2, vec![0.2, 0.1, 0.7]));
    }
}
