//! Reading the Prometheus text exposition format: the samples of a `/metrics` answer, with their
//! labels in whatever order the writer put them. The agent reads the data planes' load with it
//! (autoscaling, outliers), and the end-to-end tests read both planes' series. Comments, blank
//! lines and malformed lines are skipped; a sample is never guessed.

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// Label values unescaped (`\\`, `\"`, `\n`).
    pub labels: Vec<(&'a str, String)>,
    pub value: f64,
}

impl Sample<'_> {
    /// The value of a label, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this sample is the series named by `name` and exactly `labels` (in any order).
    pub fn is(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name
            && self.labels.len() == labels.len()
            && labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// Every well-formed sample of `text`, in order.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(sample)
}

/// One line as a sample, or `None` for a comment, a blank or a malformed line.
pub fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim_end();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        let (labels, rest) = labels(&line[name_end + 1..])?;
        (labels, rest)
    } else {
        (Vec::new(), &line[name_end..])
    };
    // A value, and an optional timestamp after it.
    let value = rest.split_ascii_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The labels after `{`, and what follows the closing `}`.
fn labels(mut s: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((out, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.trim(), value));
        s = &rest[end + 1..];
    }
}

/// The value of the series `name` with exactly `labels`, if `text` has it.
pub fn value_of(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text).find(|s| s.is(name, labels)).map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_in_any_order_and_unescaped() {
        let text = "# HELP x y\n# TYPE x counter\n\
            x_total{code=\"200\",service=\"web\"} 5\n\
            x_total{service=\"a\\\"b\\\\c\\nd\",code=\"5xx\"} 1.5 1700000000\n\
            up 1\n\
            bucket{le=\"+Inf\"} +Inf\n";
        let all: Vec<Sample> = samples(text).collect();
        assert_eq!(all.len(), 4);
        assert!(all[0].is("x_total", &[("service", "web"), ("code", "200")]));
        assert_eq!(all[0].value, 5.0);
        assert_eq!(all[1].label("service"), Some("a\"b\\c\nd"));
        assert_eq!(all[1].value, 1.5);
        assert!(all[2].is("up", &[]));
        assert_eq!(all[3].value, f64::INFINITY);
        assert_eq!(
            value_of(text, "x_total", &[("code", "200"), ("service", "web")]),
            Some(5.0)
        );
        assert_eq!(value_of(text, "x_total", &[("code", "200")]), None);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for line in [
            "",
            "# comment",
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x{a=\"unterminated} 2",
            "x notanumber",
            "x",
            "{a=\"1\"} 2",
        ] {
            assert_eq!(sample(line), None, "{line:?}");
        }
    }
}
