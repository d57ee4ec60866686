use super::*;

fn identity() -> Identity {
    Identity { fingerprint: 7, block_size: 4, n_layer: 2, n_kv_head: 1, head_dim: 2, window: 0 }
}

fn payload(seed: u8) -> Vec<u8> {
    (0..identity().payload_len()).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn open(root: &Path, budget_files: usize) -> DiskCache {
    DiskCache::open(root, (budget_files * identity().file_len()) as u64, identity(), "test model").unwrap()
}

fn folder_bytes(root: &Path) -> u64 {
    walk(root).iter().map(|p| p.metadata().unwrap().len()).sum()
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn blocks_survive_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    cache.save(1, payload(1), SaveMode::Wait);
    cache.save(2, payload(2), SaveMode::Wait);
    cache.flush();
    assert!(cache.contains(1) && !cache.wants(2) && cache.wants(3));
    drop(cache);
    let cache = open(tmp.path(), 10);
    assert_eq!(cache.load(2), Some(payload(2)));
    assert_eq!(cache.load(3), None);
    assert_eq!(cache.stats().files, 2);
    assert_eq!(cache.stats().loaded_blocks, 1);
}

#[test]
fn the_folder_never_exceeds_its_budget_and_drops_the_least_recently_used() {
    let tmp = tempfile::tempdir().unwrap();
    let budget = 3 * identity().file_len() as u64;
    let cache = open(tmp.path(), 3);
    for h in 1..=3 {
        cache.save(h, payload(h as u8), SaveMode::Wait);
    }
    cache.flush();
    assert!(cache.load(1).is_some(), "block 1 is now the most recently used");
    for h in 4..=20 {
        cache.save(h, payload(h as u8), SaveMode::Wait);
        cache.flush();
        assert!(folder_bytes(tmp.path()) <= budget);
        if h == 4 {
            assert!(cache.contains(1) && !cache.contains(2), "the least recently used went first");
        }
    }
    assert_eq!(cache.stats().files, 3);
    assert!(cache.stats().bytes <= budget);
    // A smaller budget at the next start trims the folder at once.
    drop(cache);
    let cache = open(tmp.path(), 1);
    assert_eq!(cache.stats().files, 1);
    assert!(cache.contains(20), "the newest file stays");
}

#[test]
fn a_corrupt_file_is_refused_removed_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    cache.save(5, payload(5), SaveMode::Wait);
    cache.flush();
    let path = cache.dir().join(format!("{:016x}.kv", 5));
    let mut bytes = fs::read(&path).unwrap();
    bytes[format::HEADER_LEN + 10] ^= 1;
    fs::write(&path, &bytes).unwrap();
    assert_eq!(cache.load(5), None);
    assert!(!path.exists() && !cache.contains(5));
    assert_eq!(cache.stats().rejected_files, 1);
}

#[test]
fn a_start_removes_unfinished_writes_truncated_files_and_misplaced_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    for h in 1..=3 {
        cache.save(h, payload(h as u8), SaveMode::Wait);
    }
    cache.flush();
    let dir = cache.dir().to_path_buf();
    drop(cache);
    let name = |h: u64| dir.join(format!("{h:016x}.kv"));
    // What a kill -9 can leave: a half-written temporary file...
    fs::write(dir.join(format!(".{:016x}.kv.tmp4242", 9)), &payload(9)[..10]).unwrap();
    // ...and (on a file system without ordered writes) a short final file.
    let whole = fs::read(name(1)).unwrap();
    fs::write(name(1), &whole[..whole.len() / 2]).unwrap();
    // A file of another model, renamed into this model's folder.
    let other = Identity { fingerprint: 8, ..identity() };
    fs::write(name(2), format::encode(&other, 2, "other", &payload(2))).unwrap();
    // A file whose name is not its block.
    fs::copy(name(3), name(4)).unwrap();
    let cache = open(tmp.path(), 10);
    assert_eq!(walk(tmp.path()), vec![name(3)]);
    assert!(!cache.contains(1) && !cache.contains(2) && !cache.contains(4));
    assert_eq!(cache.load(3), Some(payload(3)));
    assert_eq!(cache.stats().rejected_files, 3);
}

#[test]
fn another_models_blocks_count_toward_the_budget_but_are_never_used() {
    let tmp = tempfile::tempdir().unwrap();
    let other = Identity { block_size: 8, ..identity() };
    let theirs = DiskCache::open(tmp.path(), 1 << 20, other, "other").unwrap();
    theirs.save(1, vec![3; other.payload_len()], SaveMode::Wait);
    drop(theirs);
    let ours = DiskCache::open(tmp.path(), 1 << 20, identity(), "ours").unwrap();
    assert!(!ours.contains(1) && ours.load(1).is_none());
    assert_eq!(ours.stats().files, 1);
    assert_eq!(ours.stats().bytes, other.file_len() as u64);
    let listed = folder::summarize(tmp.path()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].model.as_str(), listed[0].block_size, listed[0].blocks), ("other", 8, 1));
}

#[test]
fn an_unusable_folder_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let err = DiskCache::open(&file.join("cache"), 1 << 20, identity(), "m").err().expect("refused");
    assert!(err.to_string().contains("a-file"), "{err}");
}

#[test]
fn remove_clears_subfolders_but_leaves_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    cache.save(1, payload(1), SaveMode::Wait);
    cache.flush();
    drop(cache);
    fs::write(tmp.path().join("notes.txt"), b"mine").unwrap();
    assert_eq!(folder::remove(tmp.path(), "").unwrap(), (1, identity().file_len() as u64));
    assert_eq!(walk(tmp.path()), vec![tmp.path().join("notes.txt")]);
}
