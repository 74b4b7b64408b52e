"""The readers of each kind of source, one module per format: named data sets (``named``), files of
one array, .npy / .npz / .csv (``arrays``), folders of .npy shards (``shards``), image folders
(``image_folder``) and IDX files and folders (``idx``). Each returns a ``vaelab.data.loaded.Loaded``;
``vaelab.data.sources.load_data`` chooses the reader."""
