//! One KCP conversation between two peers.
