//! aya's program errors as one line of text for logs and metrics.

use aya::programs::ProgramError;

/// aya's errors keep the useful part (errno, verifier log) in the source chain.
pub fn describe_program_error(err: &ProgramError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
