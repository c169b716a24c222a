//! Not implemented yet: see the open issues. This crate is an empty library so the workspace builds.
