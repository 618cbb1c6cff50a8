//! Tests of the config file's parser and merge (filled below).
