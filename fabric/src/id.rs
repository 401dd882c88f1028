//! Peer identities: Tox public keys and Tox IDs.
