//! Local servers the end-to-end tests point real clients at.
