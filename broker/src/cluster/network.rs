//! The cluster's transport (filled in by the network work).
