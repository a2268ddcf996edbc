"""Where a dataset comes from, and getting it into data/raw/<name>/ safely, one module per job.

data.dataset is one of
  toy_horse2zebra      generated offline (toy.py)
  a registry name      the CycleGAN authors' zip (registry.py): downloaded (http.py: resumable,
                       retried), extracted with zip-slip and zip-bomb checks (archive.py), verified
                       (sha256 list or official file counts)
  a folder path        checked for trainA/ trainB/ testA/ testB/ and copied, hard links when
                       possible (folder.py); links to files are followed, entries that are not
                       files are left out and listed (data.on_bad_image: skip) or stop the stage (fail)

sources.py resolves data.dataset to one of these, names its folder (`folder_name`, what every
stage calls data/raw/<name> and data/prepared/<name>) and materialises it. markers.py records in
data/raw/<name> what it holds.

data/raw/<name> is only ever replaced whole (fileio.atomic_dir), after the new content is complete
and verified: a failure at any point leaves it as it was. The download itself goes to
data/raw/.<name>.zip.part, which stays after a network failure so the next run resumes it, and is
deleted once the archive has been extracted or rejected.

CYCLEGAN_DATASETS_URL replaces the authors' server: another http(s):// base, a file:// URL, or a
local folder holding <name>.zip or an already extracted <name>/.
"""
