#![cfg(target_arch = "x86_64")]
