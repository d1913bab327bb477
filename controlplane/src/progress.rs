//! How the CLI shows an operation it follows (scale, deploy, drain): a progress bar on a
//! terminal, one plain line per change otherwise (pipes, logs, CI), so scripts read the same
//! text as before. The counting is pure and tested apart from the drawing.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Steps done out of steps to do, for the bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    pub done: u64,
    pub of: u64,
}

/// A scale from `from` instances to `to`, with `now` counted (in the table when growing,
/// still present when shrinking): one step per instance added or removed.
pub fn scale_steps(from: u64, to: u64, now: u64) -> Steps {
    let of = from.abs_diff(to).max(1);
    let done = if to >= from {
        now.saturating_sub(from)
    } else {
        from.saturating_sub(now)
    };
    Steps {
        done: done.min(of),
        of,
    }
}

/// What the follower draws on.
pub enum Progress {
    /// Not a terminal: each new status line is printed, indented.
    Lines {
        last: String,
    },
    Bar(ProgressBar),
}

impl Progress {
    /// A bar when the progress would be drawn on a terminal (indicatif draws on stderr), else
    /// lines on stdout.
    pub fn new(what: &str) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress::Lines {
                last: String::new(),
            };
        }
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix} [{bar:30}] {pos}/{len}  {wide_msg} {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress::Bar(bar)
    }

    /// The latest state: a status line and the steps it amounts to.
    pub fn update(&mut self, line: &str, steps: Steps) {
        match self {
            Progress::Lines { last } => {
                if line != last {
                    println!("  {line}");
                    line.clone_into(last);
                }
            }
            Progress::Bar(bar) => {
                bar.set_length(steps.of);
                bar.set_position(steps.done);
                bar.set_message(line.to_owned());
            }
        }
    }

    /// Stop drawing; what follows is printed as plain lines.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_counts_instances_added_or_removed() {
        assert_eq!(scale_steps(2, 5, 2), Steps { done: 0, of: 3 });
        assert_eq!(scale_steps(2, 5, 4), Steps { done: 2, of: 3 });
        // More than asked for (a discovered one, a replacement racing): never past the end.
        assert_eq!(scale_steps(2, 5, 7), Steps { done: 3, of: 3 });
        assert_eq!(scale_steps(5, 1, 5), Steps { done: 0, of: 4 });
        assert_eq!(scale_steps(5, 1, 2), Steps { done: 3, of: 4 });
        assert_eq!(scale_steps(5, 1, 0), Steps { done: 4, of: 4 });
        // Already there: one step, done once counted.
        assert_eq!(scale_steps(3, 3, 3), Steps { done: 0, of: 1 });
    }
}
