// Promptist tab, Train SFT / Train PPO: a task id for the webui's progress bar and live preview (the
// curve), as the built-in Train tab does (javascript/textualInversion.js).
function promptistStartTraining(kind, args) {
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('promptist_' + kind + '_output'),
        gradioApp().getElementById('promptist_' + kind + '_curve'), function() {}, function(progress) {
            gradioApp().getElementById('promptist_' + kind + '_progress').innerHTML = progress.textinfo || '';
        });
    var res = Array.from(args);
    res[0] = id;
    return res;
}

function promptistStartTraining_sft() {
    return promptistStartTraining('sft', arguments);
}

function promptistStartTraining_ppo() {
    return promptistStartTraining('ppo', arguments);
}
