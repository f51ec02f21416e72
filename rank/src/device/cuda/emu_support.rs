//! What the emulated-kernel tests share: guarded host buffers and poison values.

/// Guard elements on each side of a [`Guarded`] buffer.
pub const GUARD: usize = 256;

pub const NAN_F32: f32 = f32::NAN;
pub const NAN_F64: f64 = f64::NAN;
pub const NAN_BF16: u16 = 0x7fc1;

/// A buffer with `GUARD` poisoned elements on each side: a kernel reading past its ends reads
/// NaN (bf16 NaN for u16), one writing past them is caught by [`Guarded::intact`].
pub struct Guarded<T: Copy> {
    v: Vec<T>,
    poison: T,
}

impl<T: Copy> Guarded<T> {
    pub fn new(n: usize, fill: T, poison: T) -> Guarded<T> {
        let mut v = vec![poison; n + 2 * GUARD];
        v[GUARD..GUARD + n].fill(fill);
        Guarded { v, poison }
    }
    pub fn from(x: &[T], poison: T) -> Guarded<T> {
        let mut g = Guarded::new(x.len(), poison, poison);
        g.v[GUARD..GUARD + x.len()].copy_from_slice(x);
        g
    }
    pub fn get(&self) -> &[T] {
        &self.v[GUARD..self.v.len() - GUARD]
    }
    pub fn get_mut(&mut self) -> &mut [T] {
        let n = self.v.len();
        &mut self.v[GUARD..n - GUARD]
    }
    /// Whether both guards still hold the poison, bit for bit.
    pub fn intact(&self) -> bool {
        let bytes = |x: &T| {
            // SAFETY: reading the bytes of a Copy value of plain numbers.
            unsafe { std::slice::from_raw_parts((x as *const T).cast::<u8>(), size_of::<T>()) }
                .to_vec()
        };
        let p = bytes(&self.poison);
        let n = self.v.len();
        self.v[..GUARD].iter().chain(&self.v[n - GUARD..]).all(|x| bytes(x) == p)
    }
}

/// `v` widened to f64.
pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
