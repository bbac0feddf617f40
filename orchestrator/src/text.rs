//! Incremental detokenization and stop strings.
//!
//! Text deltas are produced as in TGI, one token at a time (so the text
//! depends on the tokens only, not on how steps grouped them): decode a short
//! window of already-sent tokens plus the new one, and emit the new suffix
//! only when it does not end in an incomplete character (U+FFFD), so a
//! multi-byte character is never split. Stop strings are searched in the accumulated text; the last
//! `max_stop_len - 1` bytes are held back so a stop string spanning chunks is
//! never partially streamed.

/// Decodes token ids to text (the tokenizer, or a test double).
pub trait Detokenize {
    /// Decodes `ids` (special tokens skipped).
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
}

impl Detokenize for specllava_prompt::LlavaTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        specllava_prompt::LlavaTokenizer::decode(self, ids).map_err(|e| e.to_string())
    }
}

/// Streaming text of one generation.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Decoded text so far.
    text: String,
    /// Bytes of `text` already streamed.
    sent: usize,
    stop: Vec<String>,
    /// Byte index in `text` where a stop string starts, once found.
    stopped_at: Option<usize>,
}

/// What a push produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Text to stream now.
    pub text: String,
    /// Whether a stop string was found (generation must end).
    pub stopped: bool,
    /// How many of the pushed tokens were taken: all of them, or up to the
    /// one that completed a stop string.
    pub consumed: usize,
}

impl TextStream {
    /// A stream that stops at any of `stop` (empty strings ignored).
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// The full text (cut before a stop string, if one was found).
    pub fn text(&self) -> &str {
        &self.text[..self.stopped_at.unwrap_or(self.text.len())]
    }

    /// Number of leading generated tokens whose text lies before the stop
    /// string (the tokens to keep in the history), if one was found.
    pub fn tokens_before_stop(&self, tok: &dyn Detokenize) -> Option<usize> {
        let cut = self.stopped_at?;
        let mut keep = 0;
        for n in 1..=self.ids.len() {
            match tok.decode(&self.ids[..n]) {
                Ok(t)
                    if t.len() <= cut && self.text.starts_with(t.trim_end_matches('\u{FFFD}')) =>
                {
                    keep = n
                }
                _ => break,
            }
        }
        Some(keep)
    }

    /// A bound on the tokens that pushing `new` more decodes: each pushed token decodes the
    /// window twice, and the window holds at most what is pending plus the new tokens.
    pub fn push_work(&self, new: usize) -> usize {
        2 * new * (self.ids.len() - self.prefix_offset + new)
    }

    /// Adds generated tokens; returns the text that can be streamed now.
    /// Tokens are taken one at a time, so the text never depends on how the
    /// tokens were grouped into steps.
    pub fn push(&mut self, tok: &dyn Detokenize, new_ids: &[u32]) -> Result<Delta, String> {
        if self.stopped_at.is_some() {
            return Ok(Delta {
                text: String::new(),
                stopped: true,
                consumed: 0,
            });
        }
        let mut consumed = 0;
        for &id in new_ids {
            self.ids.push(id);
            consumed += 1;
            self.step(tok, false)?;
            self.find_stop();
            if self.stopped_at.is_some() {
                break;
            }
        }
        let mut d = self.release(false);
        d.consumed = consumed;
        Ok(d)
    }

    /// Ends the stream: flushes whatever is held back (an incomplete final
    /// character is decoded as U+FFFD).
    pub fn finish(&mut self, tok: &dyn Detokenize) -> Result<Delta, String> {
        if self.stopped_at.is_none() && self.read_offset < self.ids.len() {
            self.step(tok, true)?;
        }
        Ok(self.release(true))
    }

    /// Decodes the window `ids[prefix_offset..]` against `ids[prefix_offset..read_offset]`
    /// and appends the new suffix unless it ends in an incomplete character.
    fn step(&mut self, tok: &dyn Detokenize, last: bool) -> Result<(), String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && (last || !full.ends_with('\u{FFFD}'))
            && full.is_char_boundary(prefix.len())
        {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(())
    }

    /// Looks for a stop string in the text not yet checked.
    fn find_stop(&mut self) {
        if self.stopped_at.is_some() || self.stop.is_empty() {
            return;
        }
        // Search from a little before the unsent part (a stop may straddle it).
        let max_stop = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(max_stop);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stopped_at = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
    }

    fn release(&mut self, last: bool) -> Delta {
        self.find_stop();
        let end = match self.stopped_at {
            Some(cut) => cut,
            None if last => self.text.len(),
            None => {
                let hold = self
                    .stop
                    .iter()
                    .map(String::len)
                    .max()
                    .unwrap_or(1)
                    .saturating_sub(1);
                let mut end = self.text.len().saturating_sub(hold).max(self.sent);
                while !self.text.is_char_boundary(end) {
                    end += 1;
                }
                end
            }
        };
        let end = end.max(self.sent);
        let text = self.text[self.sent..end].to_owned();
        self.sent = end;
        Delta {
            text,
            stopped: self.stopped_at.is_some(),
            consumed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each id is one byte of UTF-8 (invalid sequences decode lossily).
    struct Bytes;
    impl Detokenize for Bytes {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
    }

    fn ids(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    #[test]
    fn never_splits_a_multibyte_character() {
        let mut t = TextStream::new(vec![]);
        let e = ids("é!");
        assert_eq!(t.push(&Bytes, &e[..1]).unwrap().text, "");
        assert_eq!(t.push(&Bytes, &e[1..2]).unwrap().text, "é");
        assert_eq!(t.push(&Bytes, &e[2..]).unwrap().text, "!");
        assert_eq!(t.finish(&Bytes).unwrap().text, "");
        assert_eq!(t.text(), "é!");
    }

    #[test]
    fn stops_at_a_stop_string_across_chunks() {
        let mut t = TextStream::new(vec!["STOP".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for chunk in ["hello S", "TO", "P and more"] {
            let d = t.push(&Bytes, &ids(chunk)).unwrap();
            out.push_str(&d.text);
            stopped = d.stopped;
        }
        assert!(stopped);
        assert_eq!(out, "hello ");
        assert_eq!(t.text(), "hello ");
        assert_eq!(t.tokens_before_stop(&Bytes), Some(6));
    }

    #[test]
    fn finish_flushes_held_back_text() {
        let mut t = TextStream::new(vec!["xyz".into()]);
        let d = t.push(&Bytes, &ids("abcd")).unwrap();
        assert_eq!(d.text, "ab");
        assert_eq!(t.finish(&Bytes).unwrap().text, "cd");
    }
}
