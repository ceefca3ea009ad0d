mod atomic;
mod dispatch;
mod observe;
mod splice;
