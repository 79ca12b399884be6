-- Every flush adds to the month's row of each VPS it carries, about once a second
-- for a busy VPS. Leave half of each page free so the new version of a row lands on
-- the page of the old one: a heap-only (HOT) update, with no new entries in the
-- primary key or the period index, and the old version pruned on the next visit.
-- Pages already written keep their layout; the rows of each new month get the room.
ALTER TABLE vps_usage_periods SET (fillfactor = 50);
