//! Short byte strings kept inline: a remembered inode's name and file handle are
//! usually short, and a heap allocation of their own per inode would cost more than
//! the bytes. `H` is the heap form of the long ones (`Box<[u8]>` for names,
//! `Arc<[u8]>` for handles, which are cloned with every backing lookup).

/// `bytes[..len]` inline when at most `N` bytes, else on the heap.
#[derive(Clone, PartialEq, Eq)]
pub enum InlineBytes<const N: usize, H> {
    Inline { len: u8, bytes: [u8; N] },
    Heap(H),
}

impl<const N: usize, H: AsRef<[u8]> + for<'a> From<&'a [u8]>> InlineBytes<N, H> {
    pub fn new(b: &[u8]) -> Self {
        if b.len() <= N {
            let mut bytes = [0u8; N];
            bytes[..b.len()].copy_from_slice(b);
            InlineBytes::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            InlineBytes::Heap(H::from(b))
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            InlineBytes::Inline { len, bytes } => &bytes[..*len as usize],
            InlineBytes::Heap(h) => h.as_ref(),
        }
    }
}
