//! Requantising a GGUF file with llama.cpp's own quantiser (the function `llama-quantize`
//! runs). Tests and benchmarks make cheaper stand-ins of a model with it, the way a
//! dishonest provider would.

use std::ffi::CString;
use std::path::Path;

use super::EngineError;

/// A target quantisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    #[value(name = "q2_k")]
    Q2K,
    #[value(name = "q3_k_s")]
    Q3KS,
    #[value(name = "q3_k_m")]
    Q3KM,
}

impl Quantization {
    fn ftype(self) -> llama_cpp_sys_2::llama_ftype {
        use llama_cpp_sys_2 as sys;
        match self {
            Quantization::Q2K => sys::LLAMA_FTYPE_MOSTLY_Q2_K,
            Quantization::Q3KS => sys::LLAMA_FTYPE_MOSTLY_Q3_K_S,
            Quantization::Q3KM => sys::LLAMA_FTYPE_MOSTLY_Q3_K_M,
        }
    }
}

/// Writes `input` requantised to `to` at `output` (an already quantised input is
/// dequantised first, as `llama-quantize --allow-requantize` does).
#[allow(unsafe_code)] // llama.cpp's quantiser through its C API, SAFETY below
pub fn requantize(
    input: &Path,
    output: &Path,
    to: Quantization,
    threads: u32,
) -> Result<(), EngineError> {
    let fail = |reason: String| EngineError::Load {
        path: input.to_path_buf(),
        reason,
    };
    super::backend().map_err(&fail)?;
    let c =
        |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| fail(e.to_string()));
    let (src, dst) = (c(input)?, c(output)?);
    // SAFETY: plain C calls; both paths are NUL-terminated and outlive the call, and the
    // parameters are llama.cpp's defaults with three scalar fields changed.
    let rc = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.ftype = to.ftype();
        params.allow_requantize = true;
        params.nthread = threads as i32;
        llama_cpp_sys_2::llama_model_quantize(src.as_ptr(), dst.as_ptr(), &params)
    };
    if rc != 0 {
        return Err(fail(format!("llama.cpp's quantiser failed (code {rc})")));
    }
    Ok(())
}
