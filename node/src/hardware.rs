//! What this machine has: GPUs through NVML (loaded at run time, so a machine without the
//! NVIDIA driver simply has no GPUs) and, always, CPU model, cores, RAM and instruction-set
//! flags from `/proc`.

use beacon_proto::{Accelerator, HostInfo};
use serde::Serialize;

/// CPU flags worth advertising: the ones llama.cpp's CPU kernels use.
const INTERESTING_FLAGS: &[&str] = &[
    "avx",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "fma",
    "f16c",
    "sse4_2",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "sve",
    "i8mm",
    "dotprod",
];

/// The machine, as `info` prints it and adverts carry it.
#[derive(Clone, Debug, Serialize)]
pub struct Hardware {
    pub host: HostInfo,
    pub accelerators: Vec<Accelerator>,
    /// Why there are no GPUs, when there are none.
    pub gpu_note: Option<String>,
    /// Inference backend this build uses.
    pub backend: &'static str,
}

/// Detects the hardware. Never fails: what cannot be read is reported empty.
pub fn detect() -> Hardware {
    let (accelerators, gpu_note) = match gpus() {
        Ok(list) if list.is_empty() => (list, Some("NVML found no GPU".to_string())),
        Ok(list) => (list, None),
        Err(reason) => (Vec::new(), Some(reason)),
    };
    Hardware {
        host: host(),
        accelerators,
        gpu_note,
        backend: if cfg!(feature = "cuda") {
            "llama.cpp (CUDA)"
        } else {
            "llama.cpp (CPU)"
        },
    }
}

fn gpus() -> Result<Vec<Accelerator>, String> {
    use nvml_wrapper::Nvml;
    let nvml = Nvml::init().map_err(|e| format!("no NVIDIA GPU usable ({e}); running on CPU"))?;
    let driver = nvml.sys_driver_version().ok();
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for i in 0..count {
        let Ok(device) = nvml.device_by_index(i) else {
            continue;
        };
        let memory = device.memory_info().ok();
        out.push(Accelerator {
            vendor: "nvidia".into(),
            name: device.name().unwrap_or_else(|_| format!("GPU {i}")),
            memory_total: memory.as_ref().map(|m| m.total).unwrap_or(0),
            memory_free: memory.as_ref().map(|m| m.free).unwrap_or(0),
            compute_capability: device
                .cuda_compute_capability()
                .ok()
                .map(|c| format!("{}.{}", c.major, c.minor)),
            driver: driver.clone(),
            utilisation_pct: device
                .utilization_rates()
                .ok()
                .map(|u| u.gpu.min(100) as u8),
        });
    }
    Ok(out)
}

fn host() -> HostInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_host(&cpuinfo, &meminfo, cores())
}

fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Pure part of [`host`], for tests.
pub fn parse_host(cpuinfo: &str, meminfo: &str, cores: u32) -> HostInfo {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let cpu_model = field("model name")
        .or_else(|| field("Model"))
        .or_else(|| field("CPU part").map(|p| format!("CPU part {p}")))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let flags_line = field("flags")
        .or_else(|| field("Features"))
        .unwrap_or_default();
    let present: std::collections::HashSet<&str> = flags_line.split_whitespace().collect();
    let cpu_flags = INTERESTING_FLAGS
        .iter()
        .filter(|f| present.contains(**f))
        .map(|f| f.to_string())
        .collect();
    HostInfo {
        cpu_model,
        cores,
        ram_total: meminfo_bytes(meminfo, "MemTotal").unwrap_or(0),
        ram_free: meminfo_bytes(meminfo, "MemAvailable")
            .or_else(|| meminfo_bytes(meminfo, "MemFree"))
            .unwrap_or(0),
        cpu_flags,
    }
}

/// A `/proc/meminfo` field (`MemTotal`, `MemAvailable`, ...) in bytes.
pub fn meminfo_bytes(meminfo: &str, name: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        let kib = rest.split_whitespace().next()?.parse::<u64>().ok()?;
        Some(kib.saturating_mul(1024))
    })
}

/// Memory the system reports as available, in bytes (8 GiB when it cannot be read).
pub fn available_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo_bytes(&meminfo, "MemAvailable").unwrap_or(8 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n";
        let mem =
            "MemTotal:       24605272 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        let h = parse_host(cpu, mem, 2);
        assert_eq!(h.cpu_model, "AMD EPYC 7B13");
        assert_eq!(h.cores, 2);
        assert_eq!(h.ram_total, 24605272 * 1024);
        assert_eq!(h.ram_free, 20000000 * 1024);
        assert_eq!(h.cpu_flags, vec!["avx", "avx2", "fma", "f16c", "sse4_2"]);
        // Empty files give an honest empty answer, not a panic.
        let h = parse_host("", "", 1);
        assert_eq!(h.ram_total, 0);
        assert!(h.cpu_flags.is_empty());
    }

    #[test]
    fn detection_never_fails() {
        let hw = detect();
        assert!(hw.host.cores >= 1);
        assert!(hw.host.ram_total > 0);
        if hw.accelerators.is_empty() {
            assert!(hw.gpu_note.is_some());
        }
    }
}
