//! The annotation decoder never panics, and what it reads it writes back and reads again
//! the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use randport_core::PodRef;
use randport_core::annotation::{AnnotationValue, decode, encode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let pod = PodRef::new("fuzz", "pod");
    match decode(&pod, text) {
        Ok(AnnotationValue::Mapped(entries)) => {
            let again = decode(&pod, &encode(&entries)).expect("re-reading our own encoding");
            assert_eq!(again, AnnotationValue::Mapped(entries));
        }
        Ok(AnnotationValue::Requested) => assert!(text.trim().is_empty()),
        Err(e) => assert!(e.to_string().starts_with("pod fuzz/pod: ")),
    }
});
