//! Draft service: runs the small draft VLM and streams confidence-scored token trees.
