//! Stop strings: finds the first stop string in streamed text, holding back only the text that
//! could still turn out to start one.

/// Scans streamed text for any of a set of stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct StopScan {
    /// Text that is safe to emit now.
    pub emit: String,
    /// The stop string matched, if any; text from it on is dropped.
    pub matched: Option<String>,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() }
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopScan {
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|pos| (pos, s)))
            .min_by_key(|(pos, s)| (*pos, std::cmp::Reverse(s.len())));
        if let Some((pos, stop)) = first {
            let matched = Some(stop.clone());
            let emit = self.pending[..pos].to_string();
            self.pending.clear();
            return StopScan { emit, matched };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for stop in &self.stops {
            for (idx, _) in stop.char_indices().skip(1) {
                if idx > keep && self.pending.ends_with(&stop[..idx]) {
                    keep = idx;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopScan { emit, matched: None }
    }

    /// The held-back text, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stop_across_chunks() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("hello E").emit, "hello ");
        assert_eq!(m.push("N").emit, "");
        let scan = m.push("D and more");
        assert_eq!(scan.emit, "");
        assert_eq!(scan.matched.as_deref(), Some("END"));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("EN").emit, "");
        assert_eq!(m.push("x").emit, "ENx");
        assert_eq!(m.finish(), "");
    }

    proptest! {
        /// However the text is chunked, the output is the text up to the first stop string.
        #[test]
        fn chunking_does_not_change_the_result(text in "[abc\u{e9}]{0,40}", cuts in proptest::collection::vec(0usize..40, 0..6)) {
            let stops = vec!["ab".to_string(), "c\u{e9}c".to_string()];
            let want_end = stops.iter().filter_map(|s| text.find(s.as_str())).min();
            let want = &text[..want_end.unwrap_or(text.len())];
            let mut bounds: Vec<usize> = cuts.into_iter().filter(|&c| c <= text.len() && text.is_char_boundary(c)).collect();
            bounds.push(0);
            bounds.push(text.len());
            bounds.sort();
            bounds.dedup();
            let mut m = StopMatcher::new(&stops);
            let mut got = String::new();
            let mut stopped = false;
            for w in bounds.windows(2) {
                let scan = m.push(&text[w[0]..w[1]]);
                got.push_str(&scan.emit);
                if scan.matched.is_some() { stopped = true; break; }
            }
            if !stopped { got.push_str(&m.finish()); }
            prop_assert_eq!(got.as_str(), want);
            prop_assert_eq!(stopped, want_end.is_some());
        }
    }
}
