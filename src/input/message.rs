//! Decoders' error messages made fit for callers and logs, shared by every decoder.

/// A decoder's message made fit for callers and logs: one line, no internal structure dumps
/// (`Debug` output such as `ChunkType { type: [73, 68, …] }`), bounded in length.
pub fn clean_message(message: &str) -> String {
    let first_line = message.lines().next().unwrap_or_default();
    let cut = first_line.find(['{', '[']).unwrap_or(first_line.len());
    let text: String = first_line[..cut]
        .trim_end_matches([' ', ':', '(', ','])
        .chars()
        .take(160)
        .collect();
    if text.is_empty() {
        "invalid data".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_messages_carry_no_debug_dumps() {
        assert_eq!(
            clean_message(
                "Format error decoding Png: CRC error: expected 0x1 have 0x2 while decoding ChunkType { type: [73, 72, 68, 82] } chunk"
            ),
            "Format error decoding Png: CRC error: expected 0x1 have 0x2 while decoding ChunkType"
        );
        assert_eq!(clean_message("{}"), "invalid data");
        assert!(clean_message(&"x".repeat(1000)).len() <= 160);
    }
}
