//! A minimal writer for the "newc" cpio format, the one the kernel unpacks
//! as an initramfs (Debian's cpio tool is not installed here; the format is
//! a fixed ASCII header per entry).

use std::io::Write;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const S_IFLNK: u32 = 0o120000;

pub struct NewcWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: usize,
}

impl<W: Write> NewcWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    pub fn dir(&mut self, path: &str) -> std::io::Result<()> {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(path, S_IFREG | mode, (0, 0), data)
    }

    /// A symbolic link whose content is `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node (the kernel needs /dev/console before init
    /// runs to give it stdin/stdout).
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> std::io::Result<()> {
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[])
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let name_size = path.len() + 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{name_size:08x}{:08x}",
            0, 0, 0, data.len(), 0, 0, rdev.0, rdev.1, 0
        );
        self.put(header.as_bytes())?;
        self.put(path.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    /// Header+name and data are each padded to 4 bytes.
    fn pad(&mut self) -> std::io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_the_header_is_newc() {
        let mut w = NewcWriter::new(Vec::new());
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let bytes = w.finish().unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        // 110-byte header + "init\0" padded to 116, then 10 data bytes padded to 12.
        assert_eq!(&bytes[110..114], b"init");
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        assert_eq!(&bytes[128..134], b"070701");
        let filesize = std::str::from_utf8(&bytes[54..62]).unwrap();
        assert_eq!(u32::from_str_radix(filesize, 16).unwrap(), 10);
    }
}
