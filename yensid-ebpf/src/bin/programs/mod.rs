mod dispatch;
mod splice;
