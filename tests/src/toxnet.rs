//! A private Tox network on 127.0.0.1: several tox-bootstrapd nodes, LAN discovery off.
