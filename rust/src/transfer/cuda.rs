//! CUDA copy backend (in progress).
