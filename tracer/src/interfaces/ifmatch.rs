//! Which interfaces hvnet watches: a list of shell-style globs (`tap*,vnet*`).

use globset::{Glob, GlobSet, GlobSetBuilder};

#[derive(Debug, thiserror::Error)]
pub enum InterfaceGlobError {
    #[error("invalid interface glob {glob:?}: {reason}")]
    Invalid { glob: String, reason: String },
    #[error("no interface globs given: pass e.g. --interfaces 'tap*,vnet*'")]
    Empty,
}

/// Matches interface names against the configured globs.
#[derive(Debug, Clone)]
pub struct InterfaceMatcher {
    globs: Vec<String>,
    set: GlobSet,
}

impl InterfaceMatcher {
    pub fn new<S: AsRef<str>>(globs: &[S]) -> Result<Self, InterfaceGlobError> {
        let globs: Vec<String> = globs
            .iter()
            .map(|g| g.as_ref().trim().to_owned())
            .filter(|g| !g.is_empty())
            .collect();
        if globs.is_empty() {
            return Err(InterfaceGlobError::Empty);
        }
        let mut builder = GlobSetBuilder::new();
        for glob in &globs {
            // Interface names are at most 15 bytes and contain no '/', so
            // anything else in a pattern is a typo worth reporting.
            if glob.contains('/') || glob.chars().any(char::is_whitespace) {
                return Err(InterfaceGlobError::Invalid {
                    glob: glob.clone(),
                    reason: "interface names contain no '/' or spaces".into(),
                });
            }
            let compiled = Glob::new(glob).map_err(|err| InterfaceGlobError::Invalid {
                glob: glob.clone(),
                reason: err.kind().to_string(),
            })?;
            builder.add(compiled);
        }
        let set = builder.build().map_err(|err| InterfaceGlobError::Invalid {
            glob: globs.join(","),
            reason: err.to_string(),
        })?;
        Ok(Self { globs, set })
    }

    /// Splits a comma-separated flag value (`tap*,vnet*`) into globs.
    pub fn parse_list(text: &str) -> Result<Self, InterfaceGlobError> {
        let parts: Vec<&str> = text.split(',').collect();
        Self::new(&parts)
    }

    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    pub fn globs(&self) -> &[String] {
        &self.globs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_globs_match_libvirt_and_nova_taps_only() {
        let m = InterfaceMatcher::parse_list("tap*,vnet*").unwrap();
        assert!(m.matches("vnet0"));
        assert!(m.matches("tap3f2a1c9d-1e"));
        assert!(!m.matches("eth0"));
        assert!(!m.matches("br-int"));
        assert!(!m.matches("qvbtap0"));
    }

    #[test]
    fn question_mark_and_classes_work() {
        let m = InterfaceMatcher::parse_list("vnet?,tap[0-3]").unwrap();
        assert!(m.matches("vnet7"));
        assert!(!m.matches("vnet12"));
        assert!(m.matches("tap2"));
        assert!(!m.matches("tap4"));
    }

    #[test]
    fn invalid_globs_are_errors_naming_the_glob() {
        let err = InterfaceMatcher::parse_list("tap*,vnet[").unwrap_err();
        assert!(err.to_string().contains("vnet["), "{err}");
        assert!(InterfaceMatcher::parse_list("tap /x").is_err());
        assert!(matches!(
            InterfaceMatcher::parse_list(" , "),
            Err(InterfaceGlobError::Empty)
        ));
    }
}
