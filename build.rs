//! Build script. Without the `cuda` feature it does nothing (no nvcc, no libclang needed). With it:
//! nvcc compiles every `cuda/*.cu` (`-O3`, SASS for sm_80 and sm_90 or the `MOLORA_CUDA_ARCHS`
//! list, PTX for the highest, cudart static) into the static library `molora_kernels` (device code linked in, so any host linker can use
//! it), and bindgen turns `cuda/include/molora.h` into the Rust FFI (`$OUT_DIR/molora_ffi.rs`), so the
//! C ABI is declared once. nvcc is looked for in `$CUDA_HOME`, `$CUDA_PATH`, `$CUDA_ROOT`, `PATH`,
//! `/usr/local/cuda` and `~/.cache/cuda-13.0` (where `scripts/cuda-toolkit.sh` puts it).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
    #[cfg(feature = "emu")]
    emu::build();
}

/// Feature `emu`: the emulated device. The same `cuda/*.cu` sources compiled by the host C++ compiler
/// with `MOLORA_EMU` (cuda/emu/emu.cuh gives them the CUDA execution model) into the static library
/// `molora_emu`, every launcher renamed `molora_emu_*` and the kernels' namespace `molora_emu`, so one
/// binary holds both builds. Kernel code is compiled with GCC's `-fsanitize=thread` instrumentation,
/// whose load/store hooks are the emulator's own checks (cuda/emu/runtime.cpp, compiled without it); no
/// sanitizer runtime is linked. bindgen declares the renamed launchers and cuda/include/molora_emu.h in
/// `$OUT_DIR/molora_emu_ffi.rs`. The CUDA headers (for `__half`, `__nv_bfloat16` and the runtime's
/// types) come from the toolkit that the `cuda` feature found.
#[cfg(feature = "emu")]
mod emu {
    use std::path::{Path, PathBuf};

    /// The C++ compiler of the emulated kernels: Clang, whose ThreadSanitizer instrumentation covers
    /// every load and store (GCC's leaves out copies of small structs such as `__half`).
    /// `$MOLORA_EMU_CXX`, else `clang++` or `clang++-N` on `PATH`.
    fn find_clang() -> PathBuf {
        println!("cargo:rerun-if-env-changed=MOLORA_EMU_CXX");
        if let Some(cxx) = std::env::var_os("MOLORA_EMU_CXX") {
            return PathBuf::from(cxx);
        }
        let names: Vec<String> = std::iter::once("clang++".to_string())
            .chain((14..=22).rev().map(|v| format!("clang++-{v}")))
            .collect();
        if let Some(path) = std::env::var_os("PATH") {
            for name in &names {
                for dir in std::env::split_paths(&path) {
                    let p = dir.join(name);
                    if p.is_file() {
                        return p;
                    }
                }
            }
        }
        panic!(
            "\n\nmolora: the `emu` feature compiles the kernels with Clang (clang++ or clang++-N on PATH, or \
             $MOLORA_EMU_CXX), and none was found. Install it (`apt-get install clang`; \
             scripts/cuda-toolkit.sh does it when run as root) or set MOLORA_EMU_CXX.\n"
        );
    }

    pub fn build() {
        let manifest = PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
        );
        let cuda_dir = manifest.join("cuda");
        let include = cuda_dir.join("include");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let cuda_home = super::cuda::cuda_home();
        let cuda_include = cuda_home.join("include");
        println!("cargo:rerun-if-env-changed=MOLORA_EMU_OPT");

        // `#define molora_X molora_emu_X` for every function of molora.h.
        let header = ["molora.h", "molora_selftest.h"]
            .iter()
            .map(|h| {
                std::fs::read_to_string(include.join(h)).expect("read the headers of cuda/include")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut names: Vec<String> = Vec::new();
        for (i, _) in header.match_indices("molora_") {
            let rest = &header[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            if rest[end..].trim_start().starts_with('(') && !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        names.sort();
        let rename: String = names
            .iter()
            .map(|n| format!("#define {n} molora_emu_{}\n", &n["molora_".len()..]))
            .collect();
        let rename_h = out.join("molora_emu_rename.h");
        std::fs::write(&rename_h, rename).expect("write molora_emu_rename.h");

        let sources = super::cuda::cu_sources(&cuda_dir);
        for entry in std::fs::read_dir(cuda_dir.join("emu"))
            .expect("cuda/emu exists")
            .flatten()
        {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
        // Emulated kernels are optimised (they are slow enough as it is) and carry line tables, which the
        // emulator's reports turn into file:line through addr2line.
        let opt = std::env::var("MOLORA_EMU_OPT").unwrap_or_else(|_| "1".to_string());
        let clang = find_clang();
        let kernels = |source: &Path| {
            let mut b = cc::Build::new();
            b.cpp(true)
                .compiler(&clang)
                .debug(false)
                .opt_level_str(&opt)
                .include(&include)
                .include(&cuda_dir)
                .include(&cuda_include)
                .define("MOLORA_EMU", None)
                .define("molora", "molora_emu")
                .flag("-x")
                .flag("c++")
                .flag("-std=c++17")
                .flag("-gline-tables-only")
                .flag("-include")
                .flag(rename_h.to_string_lossy().as_ref())
                .flag("-fsanitize=thread")
                .flag("-mllvm")
                .flag("-tsan-instrument-func-entry-exit=0")
                .flag("-fno-omit-frame-pointer")
                .warnings(false)
                .file(source);
            b
        };
        let mut objects = super::cuda::compile_each(&sources, kernels);
        // The instrumentation leaves block copies and fills (struct copies, 16-byte vector loads) as
        // calls of memcpy/memset/memmove: point the kernels' calls at the emulator's checked versions.
        let objcopy = std::env::var_os("OBJCOPY").unwrap_or_else(|| "objcopy".into());
        for obj in &objects {
            let status = std::process::Command::new(&objcopy)
                .args([
                    "--redefine-sym",
                    "memcpy=molora_emu_checked_memcpy",
                    "--redefine-sym",
                    "memmove=molora_emu_checked_memmove",
                    "--redefine-sym",
                    "memset=molora_emu_checked_memset",
                ])
                .arg(obj)
                .status()
                .unwrap_or_else(|e| {
                    panic!("molora: the `emu` feature needs objcopy (binutils): {e}")
                });
            assert!(
                status.success(),
                "molora: objcopy failed on {}",
                obj.display()
            );
        }
        objects.extend(
            cc::Build::new()
                .cpp(true)
                .compiler(&clang)
                .debug(false)
                .opt_level(2)
                .include(&include)
                .include(&cuda_dir)
                .include(&cuda_include)
                .define("MOLORA_EMU", None)
                .flag("-std=c++17")
                .flag("-g1")
                .warnings(false)
                .file(cuda_dir.join("emu").join("runtime.cpp"))
                .compile_intermediates(),
        );
        cc::Build::new().objects(&objects).compile("molora_emu");
        println!("cargo:rustc-link-lib=stdc++");
        println!("cargo:rustc-link-lib=dl");

        let wrapper = out.join("molora_emu_all.h");
        std::fs::write(
            &wrapper,
            format!(
                "#include \"{}\"\n#include \"molora.h\"\n#include \"molora_selftest.h\"\n#include \"molora_emu.h\"\n",
                rename_h.display()
            ),
        )
        .expect("write molora_emu_all.h");
        let bindings = bindgen::Builder::default()
            .header(wrapper.to_string_lossy())
            .clang_arg(format!("-I{}", include.display()))
            .allowlist_function("molora_emu_.*")
            .blocklist_type("molora_.*")
            .blocklist_type("CUstream_st")
            .derive_default(true)
            .layout_tests(false)
            .generate()
            .unwrap_or_else(|e| {
                panic!("molora: bindgen could not read the emulator's headers: {e}")
            });
        bindings
            .write_to_file(out.join("molora_emu_ffi.rs"))
            .expect("write molora_emu_ffi.rs");
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};

    /// Where nvcc lives: `$CUDA_HOME`, `$CUDA_PATH`, `nvcc` on `PATH`, `/usr/local/cuda`, or the cache
    /// that `scripts/cuda-toolkit.sh` fills from NVIDIA's PyPI wheels.
    fn find_cuda_home() -> Option<PathBuf> {
        let has_nvcc = |p: &Path| p.join("bin").join("nvcc").is_file();
        for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
            if let Some(v) = std::env::var_os(var) {
                let p = PathBuf::from(v);
                if has_nvcc(&p) {
                    return Some(p);
                }
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("nvcc").is_file() {
                    if let Some(home) = dir.parent() {
                        return Some(home.to_path_buf());
                    }
                }
            }
        }
        let mut candidates = vec![PathBuf::from("/usr/local/cuda")];
        if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
            candidates.push(PathBuf::from(cache).join("cuda-13.0"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(home).join(".cache").join("cuda-13.0"));
        }
        candidates.into_iter().find(|p| has_nvcc(p))
    }

    /// `-gencode` flags: SASS for each architecture in `MOLORA_CUDA_ARCHS` (comma-separated compute
    /// capabilities, default `80,90`) and PTX for the highest, so newer GPUs JIT the kernels.
    /// `MOLORA_CUDA_ARCHS=90` builds for Hopper alone (smaller binaries).
    fn gencode_flags() -> Vec<String> {
        let list = std::env::var("MOLORA_CUDA_ARCHS").unwrap_or_else(|_| "80,90".to_string());
        let mut archs: Vec<u32> = list
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.trim_start_matches("sm_").parse().unwrap_or_else(|_| {
                    panic!("molora: MOLORA_CUDA_ARCHS={list:?}: {a:?} is not a compute capability like 90")
                })
            })
            .collect();
        archs.sort_unstable();
        archs.dedup();
        let Some(&top) = archs.last() else {
            panic!("molora: MOLORA_CUDA_ARCHS={list:?} names no architecture");
        };
        let mut flags: Vec<String> = archs
            .iter()
            .map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}"))
            .collect();
        flags.push(format!("-gencode=arch=compute_{top},code=compute_{top}"));
        flags
    }

    /// The `.cu` files of `dir`, sorted.
    pub fn cu_sources(dir: &Path) -> Vec<PathBuf> {
        let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("cuda/ exists")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        sources.sort();
        sources
    }

    /// Each source compiled by its own `cc::Build` (from `build_for`), in parallel; the objects.
    pub fn compile_each(
        sources: &[PathBuf],
        build_for: impl Fn(&Path) -> cc::Build + Sync,
    ) -> Vec<PathBuf> {
        let build_for = &build_for;
        std::thread::scope(|scope| {
            let jobs: Vec<_> = sources
                .iter()
                .map(|s| scope.spawn(move || build_for(s).compile_intermediates()))
                .collect();
            jobs.into_iter()
                .flat_map(|j| j.join().expect("a kernel compile job panicked"))
                .collect()
        })
    }

    /// The toolkit `build` uses (for the emulated build's CUDA headers).
    #[cfg_attr(not(feature = "emu"), allow(dead_code))]
    pub fn cuda_home() -> PathBuf {
        find_cuda_home().unwrap_or_else(|| {
            panic!("molora: no CUDA toolkit found (see the `cuda` feature's message)")
        })
    }

    pub fn build() {
        for var in [
            "CUDA_HOME",
            "CUDA_PATH",
            "CUDA_ROOT",
            "PATH",
            "HOME",
            "XDG_CACHE_HOME",
            "MOLORA_NVCC_FLAGS",
            "MOLORA_CUDA_ARCHS",
        ] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        println!("cargo:rerun-if-changed=cuda");
        let manifest = PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
        );
        let cuda_dir = manifest.join("cuda");
        let include = cuda_dir.join("include");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

        let Some(cuda_home) = find_cuda_home() else {
            panic!(
                "\n\nmolora: the `cuda` feature needs nvcc (CUDA 12.x or 13.x), and none was found in \
                 $CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda or ~/.cache/cuda-13.0.\n\
                 Get one with the project's script (it unpacks NVIDIA's PyPI wheels, no root needed):\n\
                 \n    export CUDA_HOME=$(scripts/cuda-toolkit.sh) PATH=\"$CUDA_HOME/bin:$PATH\"\n\n\
                 or install the CUDA toolkit and set CUDA_HOME.\n"
            );
        };

        let sources = cu_sources(&cuda_dir);
        for entry in std::fs::read_dir(&cuda_dir)
            .expect("cuda/ exists")
            .flatten()
        {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
        for entry in std::fs::read_dir(&include)
            .expect("cuda/include exists")
            .flatten()
        {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }

        // cc runs `$NVCC` (or `nvcc` from PATH) for CUDA sources; point it at the toolkit found.
        let nvcc = cuda_home.join("bin").join("nvcc");
        std::env::set_var("NVCC", &nvcc);
        // Each .cu file is its own whole-program translation unit (no relocatable device code):
        // given several files in one build, cc would compile them with `--device-c` and device-link
        // them, and a device-linked image keeps only the SASS, dropping the compute_90 PTX that lets
        // newer GPUs JIT the kernels. Kernels are always optimised: cc would otherwise follow the
        // profile and pass `-G` (device debug code, no optimisation) in debug builds. `-lineinfo`
        // keeps source lines for compute-sanitizer and ncu at no run-time cost. MOLORA_NVCC_FLAGS
        // adds flags (e.g. `-G`).
        let extra = std::env::var("MOLORA_NVCC_FLAGS").unwrap_or_default();
        let gencode = gencode_flags();
        let build_for = |source: &Path| {
            let mut b = cc::Build::new();
            b.cuda(true)
                .cudart("static")
                .debug(false)
                .opt_level(3)
                .include(&include)
                .include(&cuda_dir)
                .flag("-std=c++17")
                .flag("-O3")
                .flag("-lineinfo")
                .flag("--expt-relaxed-constexpr")
                .flag("-Xcompiler")
                .flag("-fPIC")
                .warnings(false)
                .file(source);
            for f in gencode
                .iter()
                .map(String::as_str)
                .chain(extra.split_whitespace())
            {
                b.flag(f);
            }
            b
        };
        // nvcc per file, in parallel; then one archive.
        let objects = compile_each(&sources, build_for);
        cc::Build::new().objects(&objects).compile("molora_kernels");

        let mut searched: Vec<PathBuf> = Vec::new();
        for lib in ["lib64", "lib", "targets/x86_64-linux/lib"] {
            let dir = cuda_home.join(lib);
            if dir.join("libcudart_static.a").is_file() {
                let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                if !searched.contains(&canonical) {
                    println!("cargo:rustc-link-search=native={}", dir.display());
                    searched.push(canonical);
                }
            }
        }
        if searched.is_empty() {
            panic!(
                "molora: no libcudart_static.a under {}/lib64 or lib: the toolkit is incomplete \
                 (scripts/cuda-toolkit.sh installs the runtime wheel with it)",
                cuda_home.display()
            );
        }
        println!("cargo:rustc-link-lib=static=cudart_static");
        for lib in ["rt", "dl", "pthread", "stdc++"] {
            println!("cargo:rustc-link-lib={lib}");
        }
        // For dependents (C/C++ users through a build script): DEP_MOLORA_KERNELS_ROOT / _INCLUDE.
        println!("cargo:root={}", out.display());
        println!("cargo:include={}", include.display());

        let bindings = bindgen::Builder::default()
            .header(include.join("molora.h").to_string_lossy())
            .header(include.join("molora_selftest.h").to_string_lossy())
            .allowlist_item("molora_.*")
            .allowlist_item("MOLORA_.*")
            .derive_default(true)
            .derive_debug(true)
            .derive_copy(true)
            .prepend_enum_name(false)
            .layout_tests(true)
            .generate()
            .unwrap_or_else(|e| {
                panic!(
                    "molora: bindgen could not read cuda/include/molora.h: {e}\n\
                     bindgen needs libclang: install libclang-dev (scripts/cuda-toolkit.sh does) or set LIBCLANG_PATH"
                )
            });
        bindings
            .write_to_file(out.join("molora_ffi.rs"))
            .expect("write molora_ffi.rs");
    }
}
