package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// With synchronous(normal) in WAL mode SQLite syncs the write-ahead log only when it
// checkpoints it into the database file, so a commit reaches the OS at once (safe
// against a crash of this process) but the disk only later (a power loss could undo
// more than the last moments).  syncWALs bounds that window the way MongoDB's journal
// does by default (an acknowledged write is on disk within 100 ms): it syncs every
// database's WAL file to disk every interval.  fsync flushes a file's dirty pages
// whichever descriptor wrote them, so SQLite's own connections need not be touched.
func syncWALs(ctx context.Context, dir string, every time.Duration, l *slog.Logger) {
	tick(ctx, every, func() {
		files, _ := filepath.Glob(filepath.Join(dir, "*.sqlite-wal"))
		for _, name := range files {
			if err := syncFile(name); err != nil && !os.IsNotExist(err) {
				l.Warn("wal sync", slog.String("file", name), slog.String("error", err.Error()))
			}
		}
	})
}

// syncFile flushes one file's written data to disk.
func syncFile(name string) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()

	return f.Sync()
}
