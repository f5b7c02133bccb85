//! Streaming detokenization: turns a growing list of token ids into text increments that never
//! end in half a UTF-8 character and match what decoding all ids at once gives.

use crate::{Result, Tokenizer};

/// Incremental decoder for one sequence.
///
/// Byte-level BPE tokens can carry part of a multi-byte character; decoding such a prefix yields
/// U+FFFD. The decoder holds text back until the character is complete. Decoding from a few
/// tokens before the new ones (`prefix_offset`) keeps tokenizer-dependent spacing right.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder::default()
    }

    /// Adds one generated id and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let new_text = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new_text)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end of the sequence (an incomplete character decodes as
    /// U+FFFD here, as it does when decoding all ids at once).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
