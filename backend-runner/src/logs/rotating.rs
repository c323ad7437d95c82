//! A log file rotated by size: `NAME.log`, then `NAME.log.1` (newest) .. `NAME.log.KEEP`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An append-only file that is rotated before a write would take it past `max_bytes`.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
}

impl RotatingFile {
    /// Opens (or creates) `path` for appending; an existing file's size counts.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<RotatingFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_owned(),
            max_bytes,
            keep: keep.max(1),
            file,
            size,
        })
    }

    /// Appends `line` and a newline, rotating first if the file would grow past the limit.
    /// A single line longer than the limit still goes into a fresh file whole: cutting it
    /// would lose the part that explains a crash.
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        // One write per line, so a reader tailing the file never sees half a line.
        self.file.write_all(&buf)?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        // The oldest falls off; rename errors other than "not there yet" are real.
        for n in (1..self.keep).rev() {
            match std::fs::rename(numbered(n), numbered(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "bitnet-runner-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn files_rotate_by_size_and_keep_only_the_newest() {
        let dir = TempDir::new("rotate");
        let path = dir.0.join("i0.log");
        let mut f = RotatingFile::open(&path, 20, 2).unwrap();
        // Each line is 10 bytes with its newline, so two fit in a file.
        for i in 0..7 {
            f.write_line(&format!("line {i:04}")).unwrap();
        }
        assert_eq!(read(dir.0.join("i0.log")), "line 0006\n");
        assert_eq!(read(dir.0.join("i0.log.1")), "line 0004\nline 0005\n");
        assert_eq!(read(dir.0.join("i0.log.2")), "line 0002\nline 0003\n");
        assert!(!dir.0.join("i0.log.3").exists());
    }

    #[test]
    fn reopening_counts_what_the_file_already_holds() {
        let dir = TempDir::new("reopen");
        let path = dir.0.join("i0.log");
        RotatingFile::open(&path, 20, 1)
            .unwrap()
            .write_line("first 001")
            .unwrap();
        let mut f = RotatingFile::open(&path, 20, 1).unwrap();
        f.write_line("secnd 001").unwrap();
        f.write_line("third 001").unwrap();
        assert_eq!(read(dir.0.join("i0.log.1")), "first 001\nsecnd 001\n");
        assert_eq!(read(path), "third 001\n");
    }

    #[test]
    fn an_oversized_line_is_written_whole() {
        let dir = TempDir::new("oversized");
        let path = dir.0.join("i0.log");
        let mut f = RotatingFile::open(&path, 8, 1).unwrap();
        f.write_line("a line far longer than eight bytes").unwrap();
        assert_eq!(read(path), "a line far longer than eight bytes\n");
    }
}
