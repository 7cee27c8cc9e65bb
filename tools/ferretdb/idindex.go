package main

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// FerretDB 1.24's SQLite backend finds a document by _id with the expression
// _ferretdb_sjson->'$._id' (updates, deletes, finds by _id), but indexes
// _ferretdb_sjson->"_id": SQLite cannot match the two, so every write of one
// document scans its whole table, and updating k documents of a table of n costs
// k*n.  indexIDs adds, beside FerretDB's own index, an index on the expression
// that FerretDB queries with, for every collection table of every database under
// dir, a moment after the table appears.  It changes no data and no result, only
// the query plans, so the bundled server behaves like MongoDB's _id index.
//
// A database file is first left alone for settle: FerretDB creates it and switches it
// to WAL mode with a connection of its own, and a second connection opening the new
// file at that moment can make FerretDB's first ping fail with SQLITE_BUSY.
func indexIDs(ctx context.Context, dir string, every, settle time.Duration, l *slog.Logger) {
	seen := map[string]time.Time{} // database file -> when this loop first saw it
	tick(ctx, every, func() {
		files, _ := filepath.Glob(filepath.Join(dir, "*.sqlite"))
		now := time.Now()
		present := make(map[string]time.Time, len(files))
		for _, f := range files {
			first, ok := seen[f]
			if !ok {
				first = now
			}
			present[f] = first
			if now.Sub(first) < settle {
				continue
			}
			if err := indexFile(ctx, f); err != nil && ctx.Err() == nil {
				l.Debug("id index", slog.String("file", f), slog.String("error", err.Error()))
			}
		}
		seen = present // a dropped database's file is new again when it comes back
	})
}

// tick calls fn at once, then every interval until ctx is done.
func tick(ctx context.Context, every time.Duration, fn func()) {
	t := time.NewTicker(every)
	defer t.Stop()

	for {
		fn()

		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// indexFile adds the _id expression index to the tables of one database file that
// lack it.  The file is opened afresh each time: a dropped database's file is
// removed and may be created again under the same name.
func indexFile(ctx context.Context, path string) error {
	// mode=rw: never create the file.  A database dropped since the glob must stay
	// gone: an empty file left in its place (no FerretDB metadata table) would make
	// FerretDB refuse to start.
	db, err := sql.Open("sqlite", "file:"+path+"?mode=rw&_pragma=busy_timeout(5000)&_pragma=journal_mode(wal)")
	if err != nil {
		return err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)

	rows, err := db.QueryContext(ctx, `
		SELECT t.name FROM sqlite_master t
		WHERE t.type = 'table' AND t.name NOT LIKE '\_ferretdb\_%' ESCAPE '\'
		AND t.name NOT LIKE 'sqlite\_%' ESCAPE '\'
		AND NOT EXISTS (SELECT 1 FROM sqlite_master i
			WHERE i.type = 'index' AND i.name = t.name || '_zarkov_id')`)
	if err != nil {
		return err
	}

	var tables []string
	for rows.Next() {
		var name string
		if err = rows.Scan(&name); err != nil {
			rows.Close()
			return err
		}
		tables = append(tables, name)
	}
	rows.Close()

	for _, table := range tables {
		q := fmt.Sprintf(`CREATE INDEX IF NOT EXISTS %s ON %s (_ferretdb_sjson->'$._id')`,
			quote(table+"_zarkov_id"), quote(table))
		if _, err = db.ExecContext(ctx, q); err != nil {
			return fmt.Errorf("%s: %w", table, err)
		}
	}

	return nil
}

// quote quotes an SQLite identifier.
func quote(name string) string {
	return `"` + strings.ReplaceAll(name, `"`, `""`) + `"`
}

// removeEmptyDatabases deletes, before FerretDB starts, the write-ahead files of
// databases that are gone, and database files that hold no
// table at all: files created but never given FerretDB's metadata table (the server
// killed at that instant, or an older launcher's indexer recreating a dropped
// database).  FerretDB refuses to start while one is there ("no such table:
// _ferretdb_collections"); an empty file holds no data, so it can only go.
func removeEmptyDatabases(dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "*.sqlite"))
	for _, path := range files {
		n, err := countTables(path)
		if err != nil || n > 0 {
			continue
		}
		for _, suffix := range []string{"", "-wal", "-shm"} {
			_ = os.Remove(path + suffix)
		}
		fmt.Fprintf(os.Stderr, "ferretdb: removed %s: an empty database file, which FerretDB cannot start with\n", path)
	}
	// Write-ahead logs of databases dropped while another connection had them open.
	for _, pattern := range []string{"*.sqlite-wal", "*.sqlite-shm"} {
		orphans, _ := filepath.Glob(filepath.Join(dir, pattern))
		for _, path := range orphans {
			if _, err := os.Stat(strings.TrimSuffix(strings.TrimSuffix(path, "-wal"), "-shm")); os.IsNotExist(err) {
				_ = os.Remove(path)
			}
		}
	}
}

// countTables is the number of tables in one SQLite file (which must exist).
func countTables(path string) (int, error) {
	db, err := sql.Open("sqlite", "file:"+path+"?mode=rw")
	if err != nil {
		return 0, err
	}
	defer db.Close()

	var n int
	err = db.QueryRow(`SELECT count(*) FROM sqlite_master WHERE type = 'table'`).Scan(&n)
	return n, err
}
