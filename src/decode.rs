//! pgoutput (protocol version 1) decoder. TO BE WRITTEN.
