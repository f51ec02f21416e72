//! The safetensors reader of `model.init_from` on arbitrary bytes: an error or an index whose
//! every tensor reads as exactly its shape's count of values, never a panic, an abort or an
//! allocation the input does not pay for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_rank::model::init::read_safetensors_index;

fuzz_target!(|bytes: &[u8]| {
    let Ok(index) = read_safetensors_index(bytes) else {
        return;
    };
    for (name, entry) in &index.entries {
        if let Ok(values) = index.values(bytes, name) {
            assert_eq!(values.len(), entry.shape.iter().product::<usize>(), "{name}");
        }
    }
});
