//! chattr/lsattr through the mount: FS_IOC_GETFLAGS/SETFLAGS reach the backend object
//! (tmpfs has inode flags since Linux 6.0), as the caller.

use crate::common::*;

#[test]
fn chattr_and_lsattr_pass_through_to_the_backend_as_the_caller() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let d = b.dir();
        let out = lab.sh(&format!(
            r#"echo x > "$LAB/{d}/f"; chattr +a "$LAB/{d}/f"
               lsattr "$LAB/{d}/f" | cut -c1-22; lsattr "{backend}" | cut -c1-22
               echo y >> "$LAB/{d}/f"
               if ( : > "$LAB/{d}/f" ) 2>/dev/null; then echo truncated; else echo refused; fi
               chattr -a "$LAB/{d}/f"; lsattr "$LAB/{d}/f" | cut -c1-22; cat "$LAB/{d}/f""#,
            backend = lab.backend_path(b, &format!("{d}/f")).display()
        ));
        assert_eq!(
            out,
            "-----a----------------\n-----a----------------\nrefused\n----------------------\nx\ny\n",
            "{}",
            b.name()
        );
        // A user may not make its own file immutable (CAP_LINUX_IMMUTABLE is root's):
        // labfs sets flags as the caller, not as the daemon.
        lab.sh(&format!(
            r#"echo u > "$LAB/{d}/u"; chown {USER}:{USER} "$LAB/{d}/u""#
        ));
        let (code, _, err) = lab.sh_as_status(USER, USER, &format!(r#"chattr +i "$LAB/{d}/u""#));
        assert_ne!(code, 0, "{}: user set +i", b.name());
        assert!(
            err.contains("Operation not permitted"),
            "{}: {err}",
            b.name()
        );
        let stored = lab.sh(&format!(
            r#"lsattr "{}" | cut -c1-22"#,
            lab.backend_path(b, &format!("{d}/u")).display()
        ));
        assert_eq!(stored, "----------------------\n", "{}", b.name());
    }
}

/// A backend without inode flags (ramfs) answers with its own errno.
#[test]
fn lsattr_on_a_backend_without_inode_flags_reports_the_backends_errno() {
    let lab = MountedLab::builder().xattr_less_atlas().mount();
    lab.sh(r#"mkdir "$LAB/docs"; echo x > "$LAB/docs/f""#);
    let (code, _, err) = lab.sh_status(r#"lsattr "$LAB/docs/f""#);
    assert_ne!(code, 0);
    assert!(
        err.contains("Inappropriate ioctl for device") || err.contains("not supported"),
        "{err}"
    );
}
